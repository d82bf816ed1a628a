# SPDX-License-Identifier: Apache-2.0
"""Wire compatibility: the original published wasmstore clients against a live http_server.py.

The clients are used unchanged, each in its own runtime:
- PyPI `wasmstore==0.3.0` (built on `requests`) in a virtual environment (default ./.venv-clients), driven by
  clients/py_driver.py under that environment's interpreter;
- npm `@dylibso/wasmstore@0.3.0` with `ws` (Node 20 has no global WebSocket) under clients/node_modules, driven by
  clients/driver.mjs.
Both drivers read one JSON call per line and answer one JSON result per line, so a test can interleave client
calls with checks on the server's Store.

Prerequisites are installed on demand (`python -m venv` + pip, `npm ci`) and reused; `.ci/run` prepares them.
When they cannot be installed, the tests fail under CI (env CI set) and skip with the exact reason elsewhere.

Run: python -m unittest test_clients -v
"""

import base64
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

import http_server
import wasmstore

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS_DIR = os.path.join(HERE, "clients")
VENV_DIR = os.environ.get("WASMSTORE_CLIENTS_VENV", os.path.join(HERE, ".venv-clients"))
PY_CLIENT_NAME, PY_CLIENT_VERSION = "wasmstore", "0.3.0"
NPM_PACKAGES = ("@dylibso/wasmstore", "ws")  # pinned in clients/package.json
IN_CI = bool(os.environ.get("CI"))
CALL_TIMEOUT = 30  # seconds for one client call; generous because the 2-core CI machine is shared
WATCH_TIMEOUT_MS = 5000


class PrerequisiteMissing(Exception):
    """A client runtime cannot be prepared; the message says exactly what is missing."""


# --- preparing the client runtimes (once per test run, reused across runs) ---------------------------------------

@contextlib.contextmanager
def install_lock(name):
    """Serialize installs, so that two test processes never build the same environment at once."""
    key = hashlib.sha256(HERE.encode()).hexdigest()[:12]  # one lock per checkout, kept out of the work tree
    with open(os.path.join(tempfile.gettempdir(), f"wasmstore-{name}-{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_quietly(argv, cwd=None, timeout=600):
    """Run an install command; on failure raise PrerequisiteMissing with the command and its last output line."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrerequisiteMissing(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise PrerequisiteMissing(f"{' '.join(argv)} failed (exit {done.returncode}): {lines[-1]}")
    return done.stdout


def venv_python():
    return os.path.join(VENV_DIR, "bin", "python")


def installed_python_client_version():
    if not os.path.exists(venv_python()):
        return None
    probe = subprocess.run(
        [venv_python(), "-c", f"import importlib.metadata as m; print(m.version({PY_CLIENT_NAME!r}))"],
        capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_python_client():
    """Return the interpreter of a virtual environment holding the pinned PyPI client."""
    with install_lock("venv-clients"):
        if installed_python_client_version() != PY_CLIENT_VERSION:
            run_quietly([sys.executable, "-m", "venv", VENV_DIR])
            run_quietly([venv_python(), "-m", "pip", "install", "--quiet",
                         f"{PY_CLIENT_NAME}=={PY_CLIENT_VERSION}"])
        found = installed_python_client_version()
        if found != PY_CLIENT_VERSION:
            raise PrerequisiteMissing(f"{VENV_DIR} has {PY_CLIENT_NAME} {found}, not {PY_CLIENT_VERSION}")
    return venv_python()


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


def ensure_node_client():
    """Return the node executable, with clients/node_modules holding the pinned npm packages."""
    node = shutil.which("node")
    if node is None:
        raise PrerequisiteMissing("the `node` command is not installed (Node 20 is needed for the npm client)")
    pinned = pinned_npm_versions()
    with install_lock("node-clients"):
        if any(installed_npm_version(name) != version for name, version in pinned.items()):
            npm = shutil.which("npm")
            if npm is None:
                raise PrerequisiteMissing("the `npm` command is not installed; needed to install clients/package.json")
            run_quietly([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CLIENTS_DIR)
        for name, version in pinned.items():
            if installed_npm_version(name) != version:
                raise PrerequisiteMissing(f"clients/node_modules has {name} {installed_npm_version(name)}, "
                                          f"not {version}")
    return node


_prepared = {}


def prepare(ensure):
    """Run ensure() once per process; missing prerequisites fail under CI and skip (with the reason) elsewhere."""
    if ensure not in _prepared:
        try:
            _prepared[ensure] = (True, ensure())
        except PrerequisiteMissing as exc:
            _prepared[ensure] = (False, str(exc))
    ok, value = _prepared[ensure]
    if ok:
        return value
    if IN_CI:
        raise AssertionError(f"client prerequisite missing in CI: {value}")
    raise unittest.SkipTest(f"client prerequisite missing (CI unset, so skipping): {value}")


# --- test data ---------------------------------------------------------------------------------------------------

def leb128(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def section(section_id, payload):
    return bytes([section_id]) + leb128(len(payload)) + payload


def wasm_module(tag):
    """A minimal valid module, made distinct by a custom section holding `tag`."""
    name = b"wasmstore-test"
    return b"\0asm\x01\0\0\0" + section(0, leb128(len(name)) + name + tag.encode())


def answer_module(value):
    """A module exporting `answer: () -> i32` returning `value` (0..63, a one-byte signed LEB128)."""
    types = section(1, b"\x01\x60\x00\x01\x7f")
    functions = section(3, b"\x01\x00")
    exports = section(7, b"\x01" + leb128(6) + b"answer" + b"\x00\x00")
    body = b"\x00\x41" + bytes([value]) + b"\x0b"
    code = section(10, b"\x01" + leb128(len(body)) + body)
    return b"\0asm\x01\0\0\0" + types + functions + exports + code


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


def unb64(value):
    return None if value is None else base64.b64decode(value["b64"])


# --- live server and client drivers ------------------------------------------------------------------------------

def start_server(test, **options):
    """Serve a fresh store on a free loopback port for the duration of `test`; return (store, base_url)."""
    root = tempfile.mkdtemp(prefix="wasmstore-clients-")
    test.addCleanup(shutil.rmtree, root, ignore_errors=True)
    store = wasmstore.Store(root)
    server = http_server.make_server(store, "127.0.0.1", 0, quiet=True, **options)
    thread = threading.Thread(target=server.serve_forever, name="clients-test-server", daemon=True)
    thread.start()
    test.addCleanup(thread.join, 10)
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    host, port = server.server_address[:2]
    return store, f"{'https' if options.get('tls') else 'http'}://{host}:{port}"


def start_server_process(test, *options):
    """Run `python http_server.py --port 0 ...` on a fresh root, as a user would; return (root, base_url)."""
    root = tempfile.mkdtemp(prefix="wasmstore-clients-cli-")
    test.addCleanup(shutil.rmtree, root, ignore_errors=True)
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "http_server.py"), "--root", root, "--port", "0",
                                "--quiet", *options], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    test.addCleanup(stop_process, process, reader)
    try:
        banner = lines.get(timeout=CALL_TIMEOUT)  # "wasmstore: serving ROOT on URL"
    except queue.Empty:
        test.fail(f"http_server.py printed nothing within {CALL_TIMEOUT} s")
    test.assertIn(" on http", banner)
    return root, banner.rsplit(" on ", 1)[1].strip()


def stop_process(process, stderr_reader):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    stderr_reader.join(10)  # it ends at EOF, now that the process is gone
    process.stderr.close()


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


class PythonClient:
    """Calls on the PyPI client in its virtual environment: `client.add("a.wasm", data)` runs Client(...).add there."""

    def __init__(self, driver, url, auth=None, branch=None):
        self.driver = driver
        self.options = {"url": url, "auth": auth, "branch": branch}

    def raw(self, call, *args):
        encoded = [b64(arg) if isinstance(arg, bytes) else arg for arg in args]
        return self.driver.call_raw(call, *encoded, client=self.options)

    def __getattr__(self, call):
        def invoke(*args):
            answer = self.raw(call, *args)
            if "error" in answer:
                raise ClientCallFailed(f"python client {call}{args!r:.200}: {answer['error']}")
            result = answer["ok"]
            return unb64(result) if isinstance(result, dict) and set(result) == {"b64"} else result
        return invoke


class NodeClient:
    """Calls on the npm client: `client.add("a.wasm", data)` runs new Client(url, branch, auth).add in Node."""

    def __init__(self, driver, url, branch=None, auth=None):
        self.driver = driver
        self.options = [url, branch, auth]

    def raw(self, call, *args):
        encoded = [b64(arg) if isinstance(arg, bytes) else arg for arg in args]
        return self.driver.call_raw(call, *encoded, client=self.options)

    def __getattr__(self, call):
        def invoke(*args):
            answer = self.raw(call, *args)
            if "error" in answer:
                raise ClientCallFailed(f"npm client {call}{args!r:.200}: {answer['error']}")
            return answer["ok"]
        return invoke


def python_driver(test, extra_env=None):
    return Driver(test, [prepare(ensure_python_client), os.path.join(CLIENTS_DIR, "py_driver.py")], extra_env)


def node_driver(test, extra_env=None):
    driver = Driver(test, [prepare(ensure_node_client), os.path.join(CLIENTS_DIR, "driver.mjs")], extra_env)
    ready = driver.read_answer("node driver start-up")
    test.assertEqual(ready, {"ready": True})
    return driver


def ensure_openssl():
    openssl = shutil.which("openssl")
    if openssl is None:
        raise PrerequisiteMissing("the `openssl` command is not installed (apt-get install openssl)")
    return openssl


def self_signed_certificate(test):
    """Create a key and a self-signed certificate for 127.0.0.1; return (keyfile, certfile)."""
    openssl = prepare(ensure_openssl)
    directory = tempfile.mkdtemp(prefix="wasmstore-clients-tls-")
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    keyfile, certfile = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    run_quietly([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", keyfile,
                 "-out", certfile, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], timeout=60)
    return keyfile, certfile


def raw_request(url, method, path, body=None, headers=None):
    """One request with http.client (for routes a client cannot reach); returns (status, body bytes)."""
    connection = http.client.HTTPConnection(url.split("//", 1)[1], timeout=CALL_TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- the PyPI client ---------------------------------------------------------------------------------------------

class PythonClientTest(unittest.TestCase):
    """Every method of PyPI wasmstore 0.3.0 against the live server, checked against the server's Store."""

    def setUp(self):
        self.store, self.url = start_server(self)
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
        module = wasm_module("big-" + "x" * (3 << 20))  # 3 MiB: a multi-read upload and a sendfile download
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
        status, body = raw_request(self.url, "POST", f"/api/v1/hash/{digest}/copy/x.wasm", body=b"")
        self.assertEqual(status, 200, body)
        self.assertEqual(self.client.find("copy/x.wasm"), module)
        self.assertEqual(self.client.hash("copy/x.wasm"), digest)

        status, _ = raw_request(self.url, "POST", f"/api/v1/hash/{'0' * 64}/copy/y.wasm", body=b"")
        self.assertEqual(status, 404)
        self.assertIsNone(self.client.find("copy/y.wasm"))

    def test_set_route_honours_branch_header(self):
        digest = self.client.add("src.wasm", wasm_module("src"))
        self.client.create_branch("dev")
        status, body = raw_request(self.url, "POST", f"/api/v1/hash/{digest}/on-dev.wasm", body=b"",
                                   headers={"Wasmstore-Branch": "dev"})
        self.assertEqual(status, 200, body)
        self.assertEqual(self.store.list(branch="dev")["/on-dev.wasm"], digest)
        self.assertNotIn("/on-dev.wasm", self.store.list())


class PythonClientAuthTest(unittest.TestCase):
    """The PyPI client with keys: a read-only key may GET but not POST/DELETE."""

    ADMIN, READER = "admin-key-1f3a", "read-key-9b2c"

    def setUp(self):
        self.store, self.url = start_server(self, auth=f"{self.ADMIN}:*;{self.READER}:GET")
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
        status, _ = raw_request(self.url, "POST", "/api/v1/module/new.wasm", body=wasm_module("new"),
                                headers={"Wasmstore-Auth": self.READER})  # what the client sent, status visible
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
        keyfile, certfile = self_signed_certificate(self)
        store, url = start_server(self, tls=(keyfile, certfile))
        driver = python_driver(self, {"REQUESTS_CA_BUNDLE": certfile})  # trust exactly this certificate
        client = PythonClient(driver, url)
        module = wasm_module("tls")
        self.assertEqual(client.add("secure/t.wasm", module), sha256(module))
        self.assertEqual(client.find("secure/t.wasm"), module)
        self.assertEqual(client.list(), {"/secure/t.wasm": sha256(module)})
        self.assertEqual(store.find("secure/t.wasm"), module)


# --- the npm client ----------------------------------------------------------------------------------------------

class NodeClientTest(unittest.TestCase):
    """@dylibso/wasmstore 0.3.0 under Node: watch over the WebSocket, instantiate, and the other methods."""

    def setUp(self):
        self.store, self.url = start_server(self)
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
        keyfile, certfile = self_signed_certificate(self)
        store, url = start_server(self, tls=(keyfile, certfile))
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
        root, url = start_server_process(self, "--auth", "cli-admin:*;cli-reader:GET")
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
        root, url = start_server_process(self)
        client = NodeClient(node_driver(self), url)
        client.watch_open()
        module = wasm_module("from-cli")
        with tempfile.NamedTemporaryFile(suffix=".wasm") as file:
            file.write(module)
            file.flush()
            added = subprocess.run([sys.executable, os.path.join(HERE, "wasmstore.py"), "add", "--root", root,
                                    file.name, "cli/added.wasm"], capture_output=True, text=True, timeout=60)
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertEqual(client.watch_next(WATCH_TIMEOUT_MS),
                         {"/cli/added.wasm": {"action": "added", "hash": sha256(module)}})
        self.assertEqual(client.hash("cli/added.wasm"), sha256(module))


class NodeClientAuthTest(unittest.TestCase):
    """The npm client's auth() with keys configured."""

    def setUp(self):
        self.store, self.url = start_server(self, auth="writer-77:GET,POST;reader-42:GET")
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


if __name__ == "__main__":
    unittest.main()
