# SPDX-License-Identifier: Apache-2.0
"""Tests of the project's WIT (wit/) and test guests (guests/), run through kvhost end to end.

Map of this file:
  helpers              paths, a real redis-server on a free loopback port, the kvhost CLI runner
  WitTypes, describe_* a small reader of the wasi:keyvalue WIT and a describer of wasmtime's types,
                       so guests can be compared with the WIT signature by signature
  WitFilesTest         wit/ holds both versions; every keyvalue import/export of every WAT guest has
                       the WIT signature (bad-import.wat: exactly its deliberate mismatch); the kv
                       guests together import every function; componentize-py parses the WIT
  GuestContractMixin   every function of both versions through Host.call, asserting results;
                       run against each backend: MemoryGuestTest, SqliteGuestTest, RedisGuestTest
  GetErrorCasesTest    bucket.get returning each wasi error case to a guest (the wasmtime-py 50 bug)
  GuestCliTest         the same guests through `python kvhost.py call | run | kv`
  PyCounterTest        the componentize-py guest build/py-counter.wasm (built by guests/build.sh)

Run from the repository root: python -m unittest test_guests -v
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import wasmtime
from wasmtime import component as wc

import kvhost

ROOT = os.path.dirname(os.path.abspath(__file__))
WIT = os.path.join(ROOT, "wit")
GUESTS = os.path.join(ROOT, "guests")
KVHOST = os.path.join(ROOT, "kvhost.py")
PY_COUNTER = os.path.join(ROOT, "build", "py-counter.wasm")
KV_DRAFT = os.path.join(GUESTS, "kv-draft.wat")
KV_DRAFT2 = os.path.join(GUESTS, "kv-draft2.wat")
WATCHER_DRAFT = os.path.join(GUESTS, "watcher-draft.wat")
WATCHER_DRAFT2 = os.path.join(GUESTS, "watcher-draft2.wat")
BAD_IMPORT = os.path.join(GUESTS, "bad-import.wat")
CLI_RUN = os.path.join(GUESTS, "cli-run.wat")
VERSIONS = ("0.2.0-draft", "0.2.0-draft2")
IN_CI = bool(os.environ.get("CI"))
U64_MAX = (1 << 64) - 1
S64_MAX = (1 << 63) - 1


def b64(data):
    return base64.b64encode(data).decode("ascii")


def unique_namespace():
    """A fresh tenant per test, so tests sharing a SQLite file or a Redis db never see each other."""
    return "t-" + uuid.uuid4().hex[:12]


def require_tool(name, install_hint):
    """Skip outside CI with the exact reason; in CI a missing tool is a failure (CI installs it)."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed ({install_hint}); .ci/run installs it"
    if IN_CI:
        raise AssertionError(message)
    raise unittest.SkipTest(message)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, in-memory only, in a temporary directory."""

    def __init__(self):
        self.binary = require_tool("redis-server", "apt-get install -y redis-server")
        self.dir = tempfile.mkdtemp(prefix="test-guests-redis-")
        self.port = None
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port=None):
        self.port = port or free_port()
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within 10 s")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_kvhost(*args, env=None, timeout=120):
    """Run the kvhost CLI; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, KVHOST, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


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


# ---------------------------------------------------------------------------
# the WIT files and what the guests import
# ---------------------------------------------------------------------------

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
        for name in sorted(os.listdir(GUESTS)):
            if not name.endswith(".wat"):
                continue
            with open(os.path.join(GUESTS, name), encoding="utf-8") as f:
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
        self.assertEqual(checked, 37)   # kv guests 13 + 10, watchers 2 x (2 exports + 3 imports), cli-run 2, bad-import 2

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


# ---------------------------------------------------------------------------
# every guest function through Host.call, on each backend
# ---------------------------------------------------------------------------

class GuestContractMixin:
    """Every function of both wasi:keyvalue versions, called by the WAT guests through kvhost.

    Subclasses set up `kv` (a Backend or URL shared by the class) in setUpClass.
    """

    kv = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cache_dir = tempfile.mkdtemp(prefix="test-guests-cache-")
        cls.addClassCleanup(shutil.rmtree, cls.cache_dir, ignore_errors=True)

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

    # -- store -------------------------------------------------------------------------------

    def test_open_default_allowed_unknown_denied_and_invalid_buckets(self):
        limited = self.make_host(allow_buckets=["default", "b", "secret"], deny_buckets=["secret"])
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
        self.assertEqual(self.call(KV_DRAFT2, "set", "", "k", b64(b"via empty id")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "default", "k"), {"ok": list(b"via empty id")})

    def test_set_get_exists_delete_round_trip_on_both_versions(self):
        value = bytes(range(256))
        for guest in (KV_DRAFT, KV_DRAFT2):
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": None})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": False})
            self.assertEqual(self.call(guest, "set", "b", "k", b64(value)), {"ok": None})
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": list(value)})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": True})
            self.assertEqual(self.call(guest, "set", "b", "k", []), {"ok": None})
            self.assertEqual(self.call(guest, "get", "b", "k"), {"ok": []})       # empty, not missing
            self.assertEqual(self.call(guest, "delete", "b", "k"), {"ok": None})
            self.assertEqual(self.call(guest, "exists", "b", "k"), {"ok": False})
            self.assertEqual(self.call(guest, "delete", "b", "k"), {"ok": None})  # missing key: still ok
        # a value larger than the guest's first memory page makes its allocator grow memory
        big = os.urandom(150_000)
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "big", b64(big)), {"ok": None})
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
        self.assertEqual(self.call(g, "set", "b", "text", b64(b"abc")), {"ok": None})
        self.assertRegex(self.call(g, "increment", "b", "text", 1).get("err", ""), r"^other:")
        self.assertEqual(self.call(g, "get", "b", "text"), {"ok": list(b"abc")})  # unchanged
        self.assertEqual(self.call(g, "set", "b", "big", b64(str(S64_MAX).encode())), {"ok": None})
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
        self.assertEqual(self.call(g, "cas-swap", "b", "c", b64(b"one")), {"ok": None})     # saw: missing
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"one")})
        self.assertEqual(self.call(g, "cas-swap", "b", "c", b64(b"two")), {"ok": list(b"one")})
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"two")})

    def test_cas_conflict_fails_then_retries_with_the_fresh_handle(self):
        g = KV_DRAFT2
        self.assertEqual(self.call(g, "set", "b", "c", b64(b"start")), {"ok": None})
        # cas.new sees "start"; set(theirs) races it; swap(ours) must fail with cas-failed;
        # the fresh handle's current() sees "theirs" and its swap succeeds.
        self.assertEqual(self.call(g, "cas-race", "b", "c", b64(b"theirs"), b64(b"ours")), {"ok": list(b"theirs")})
        self.assertEqual(self.call(g, "get", "b", "c"), {"ok": list(b"ours")})
        # the same on a key that did not exist when the first handle was made
        self.assertEqual(self.call(g, "cas-race", "b", "new", b64(b"x"), b64(b"y")), {"ok": list(b"x")})
        self.assertEqual(self.call(g, "get", "b", "new"), {"ok": list(b"y")})

    # -- batch ---------------------------------------------------------------------------------

    def test_batch_get_many_set_many_delete_many_on_both_versions(self):
        for guest in (KV_DRAFT, KV_DRAFT2):
            bucket = "batch-" + os.path.basename(guest)[:-4]
            self.assertEqual(self.call(guest, "set-many", bucket, [["a", [1]], ["b", b64(b"\x00\xff")], ["e", []]]),
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
        self.host.attach_watcher(self.host.load(WATCHER_DRAFT2), ["watched"])
        self.host.attach_watcher(self.host.load(WATCHER_DRAFT), ["watched-old"])
        self.assertEqual(self.call(KV_DRAFT2, "set", "watched", "a", b64(b"1")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "set", "watched", "b", b64(b"two")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "watched", [["c", []], ["d", [0x33]]]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "delete", "watched", "a"), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "delete-many", "watched", ["c"]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "unwatched", "z", [1]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "watched-old", "o", b64(b"old")), {"ok": None})
        log = self.call(KV_DRAFT2, "get", "watch-log", "log")
        self.assertEqual(bytes(log["ok"]).decode(),
                         "set a=1\nset b=two\nset c=\nset d=3\ndelete a\ndelete c\nset o=old\n")
        self.assertEqual(self.host.watch_errors, [])

    def test_cli_run_guest_counts_runs_prints_and_sets_the_exit_status(self):
        out = os.path.join(tempfile.mkdtemp(prefix="test-guests-out-"), "stdout")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), ignore_errors=True)
        host = self.make_host(stdout=out)
        guest = host.load(CLI_RUN)
        self.assertEqual(host.run(guest, ["hello world"]), 0)
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), "runs=1\narg:hello world\n")
        self.assertEqual(host.run(guest, ["x", "fail"]), 1)
        with open(out, encoding="utf-8") as f:
            self.assertEqual(f.read(), "runs=2\narg:x\narg:fail\n")
        self.assertEqual(self.call(KV_DRAFT2, "get", "cli", "runs"), {"ok": list(b"2")})
        denied = self.make_host(stdout=out, deny_buckets=["cli"])
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
        self.assertEqual(self.call(KV_DRAFT2, "set-get-loop", "b", "k", b64(b"abc"), 50), {"ok": 50})
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
        folder = tempfile.mkdtemp(prefix="test-guests-sqlite-")
        cls.addClassCleanup(shutil.rmtree, folder, ignore_errors=True)
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
        port = self.redis.port
        self.redis.stop()
        try:
            for guest in (KV_DRAFT, KV_DRAFT2):
                self.assertRegex(self.call(guest, "get", "b", "k").get("err", ""), r"^other:.+")
                self.assertRegex(self.call(guest, "increment", "b", "n", 1).get("err", ""), r"^other:.+")
        finally:
            self.redis.start(port)
        # the data was in memory only, so the restarted server is empty; the host recovers
        self.assertEqual(self.call(KV_DRAFT2, "get", "b", "k"), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", [2]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "b", "k"), {"ok": [2]})


# ---------------------------------------------------------------------------
# bucket.get returning each error case
# ---------------------------------------------------------------------------

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
        self.cache_dir = tempfile.mkdtemp(prefix="test-guests-cache-")
        self.addCleanup(shutil.rmtree, self.cache_dir, ignore_errors=True)
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


# ---------------------------------------------------------------------------
# the same guests through the kvhost command line
# ---------------------------------------------------------------------------

class GuestCliTest(unittest.TestCase):
    """`python kvhost.py call | run | kv` with the WAT guests on a SQLite file."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="test-guests-cli-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, ignore_errors=True)
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
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "k", b64(b"hi")), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT, "get", "b", "k"), {"ok": list(b"hi")})
        self.assertEqual(self.call(KV_DRAFT2, "set-many", "b", [["a", [1, 2]], ["z", []]]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "get-many", "b", ["a", "nope"]), {"ok": [["a", [1, 2]], None]})
        self.assertEqual(self.call(KV_DRAFT2, "list-keys", "b", None), {"ok": [["a", "k", "z"], None]})
        self.assertEqual(self.call(KV_DRAFT, "list-keys", "b", None), {"ok": [["a", "k", "z"], None]})
        self.assertEqual(self.call(KV_DRAFT, "increment", "b", "n", U64_MAX - 1), {"ok": U64_MAX - 1})
        self.assertEqual(self.call(KV_DRAFT2, "cas-race", "b", "c", b64(b"t"), b64(b"o")), {"ok": list(b"t")})
        self.assertEqual(self.call(KV_DRAFT2, "delete-many", "b", ["a", "z"]), {"ok": None})
        self.assertEqual(self.call(KV_DRAFT2, "exists", "b", "a"), {"ok": False})
        self.assertEqual(self.call(KV_DRAFT2, "open", "bad/name"), {"err": "no-such-store"})

    def test_kv_subcommand_sees_what_guests_wrote(self):
        self.assertEqual(self.call(KV_DRAFT2, "set", "b", "greeting", b64(b"hello")), {"ok": None})
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


# ---------------------------------------------------------------------------
# the componentize-py guest
# ---------------------------------------------------------------------------

class PyCounterTest(unittest.TestCase):
    """build/py-counter.wasm: a Python app compiled by componentize-py 0.25.1 (guests/build.sh)."""

    @classmethod
    def setUpClass(cls):
        if not os.path.exists(PY_COUNTER):
            message = ("build/py-counter.wasm is missing: build it with "
                       "`pip install componentize-py==0.25.1 && bash guests/build.sh`")
            if IN_CI:
                raise AssertionError(message + " (.ci/run must do this before the tests)")
            raise unittest.SkipTest(message)
        cls.folder = tempfile.mkdtemp(prefix="test-guests-py-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, ignore_errors=True)
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
        build = os.path.join(GUESTS, "build.sh")
        first = subprocess.run(["bash", build], capture_output=True, text=True, timeout=600)
        self.assertEqual(first.returncode, 0, first.stderr)      # rebuilds only if a source is newer
        before = os.stat(PY_COUNTER).st_mtime_ns
        again = subprocess.run(["bash", build], capture_output=True, text=True, timeout=60)
        self.assertEqual((again.returncode, again.stdout), (0, "build.sh: build/py-counter.wasm is up to date\n"))
        self.assertEqual(os.stat(PY_COUNTER).st_mtime_ns, before)

    def test_errors_reach_the_python_guest_as_wasi_error_cases(self):
        host = kvhost.Host(kv=self.kv, namespace=unique_namespace(), cache_dir=self.cache_dir, timeout=120,
                           allow_buckets=["counter"], deny_buckets=["counter"])
        self.addCleanup(host.close)
        guest = host.load(PY_COUNTER)
        self.assertEqual(host.call(guest, "bump", []), {"err": "access-denied"})
        self.assertEqual(host.call(guest, "peek", ["elsewhere", "k"]), {"err": "no-such-store"})


if __name__ == "__main__":
    unittest.main()
