# SPDX-License-Identifier: Apache-2.0
"""bench_http.py: the REST API figures (run it as ``python bench.py http``).

Figures, each the median of --rounds rounds; every ratio is taken against a baseline measured
in the same run, by the same load generator, with the rounds alternating:

Ratios are the median of the per-round ratios (each round measures both sides back to back).

- GET of a 100 KB module over 8 concurrent keep-alive connections: requests/s of
  http_server.py vs a minimal ``http.server`` handler returning the same bytes from memory
  (goal: ratio >= 0.8); p50/p99 latency of both.
- POST of small distinct modules from one keep-alive client: requests/s vs the in-process
  ``Store.add`` rate of the same modules into a fresh store (goal: ratio >= 0.8); p50/p99 of both.
  Two workloads: function-less modules (a custom section: the HTTP layer's own cost shows most)
  and modules with POST_FUNCTIONS functions of code, as users store (validation is then part
  of both sides' cost), built as ``bench.py store`` builds them.
  Adds are fsync-bound and the disk is shared, so the two sides alternate in blocks of
  POST_BLOCK adds within each round (a persistent client process runs the HTTP blocks).
- workers: wrk (a C load generator, so it takes little of the CPU it measures) with
  WORKERS_CONNECTIONS keep-alive connections against ``http_server.py --workers 2`` vs
  ``--workers 1`` on one store: GET of a ~1 KB module and a warm call of add(2, 3) from
  guests/run/numbers.wat (goal: ratio >= 1.6 each on two cores), with the server's CPU time per
  request (all its processes; goal: no higher with two workers), and the cores the server,
  wrk and every other process used meanwhile: on a shared machine whose other jobs take the
  second core, two workers cannot reach the goal, and those columns say so. For reference, one
  worker on a single connection: its threads then never wait for each other's GIL.

The load generator is a separate process (this file run with --loadgen): one thread driving
raw keep-alive sockets with ``selectors``, so that it is not itself limited by the GIL.
Both servers run in this process, one at a time, with access logs off.
"""

__version__ = "0.1.0"
__all__ = ["main"]

import argparse
import http.server
import importlib.util
import json
import os
import queue
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTP_SERVER = os.path.join(REPO_DIR, "http_server.py")
NUMBERS_WAT = os.path.join(REPO_DIR, "guests", "run", "numbers.wat")
GET_BODY_SIZE = 100 * 1024
GET_CONNECTIONS = 8
GOAL_RATIO = 0.8
POST_BLOCK = 20                  # adds per block; in-process and HTTP blocks alternate
POST_FUNCTIONS = 10              # functions per module of the realistic POST workload
WORKERS_GOAL = 1.6               # requests/s of 2 worker processes over 1, GET and call each
WORKERS_CONNECTIONS = 16         # wrk's keep-alive connections in the workers figure
WORKERS_SMALL_SIZE = 1024        # the GET of the workers figure: a ~1 KB module
START_TIMEOUT = 120.0            # seconds for a server process to listen (a loaded machine)
SERVING_RE = re.compile(r"^wasmstore: serving .* on (http://\S+)(?: \(\d+ worker processes\))?$")
WRK_RATE_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_COUNT_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
WRK_NON_2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)", re.M)
WRK_ERRORS_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_PERCENTILE_RE = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)", re.M)
WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


# ------------------------------------------------------------------------------ modules

def _leb(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wasm_module(tag, padding=0):
    """A valid core module: header + one custom section named `tag`, padded with zeros."""
    name = tag.encode()
    payload = _leb(len(name)) + name + b"\0" * padding
    return b"\0asm\x01\0\0\0\x00" + _leb(len(payload)) + payload


def post_module(tag, functions=0):
    """A distinct module to add: function-less (wasm_module), or with `functions` functions of
    code as a compiler emits them (bench_store.code_module_bytes)."""
    return _bench_store().code_module_bytes(tag, functions) if functions else wasm_module(tag)


def _bench_store():
    """benchmarks/bench_store.py, loaded by file path as bench.py loads areas (once)."""
    if "bench_store" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "bench_store", os.path.join(REPO_DIR, "benchmarks", "bench_store.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_store"]


# ------------------------------------------------------------------------ load generator

DRAIN_TIMEOUT = 30.0    # seconds the answers still in flight at a block's end may take

class _Conn:
    __slots__ = ("sock", "started", "header", "body_left", "requests_sent")

    def __init__(self, sock):
        self.sock = sock
        self.started = 0.0
        self.header = bytearray()
        self.body_left = None
        self.requests_sent = 0


def _parse_head(head):
    """(status, content length) of a response head."""
    lines = bytes(head).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, length


def drive(conns, selector, request_for, seconds, drain=False):
    """Keep the keep-alive connections `conns` (registered in `selector`, non-blocking) busy for
    `seconds`: each sends request_for() and, after each full answer, the next one. Returns
    (latencies, statuses, errors, elapsed). drain: answers still in flight at the end are read
    (not counted), so the connections are idle and in step afterwards; else they are left."""
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    latencies, statuses, errors = [], {}, 0

    def send(conn):
        conn.sock.setblocking(True)
        conn.sock.sendall(request_for())         # small: fits the socket buffer at once
        conn.sock.setblocking(False)
        conn.started = time.perf_counter()
        conn.header.clear()
        conn.body_left = None

    for conn in conns:
        send(conn)
    in_flight = len(conns)
    begin = time.perf_counter()
    end = begin + seconds
    while in_flight:
        now = time.perf_counter()
        if now >= end and not drain:
            break
        events = selector.select(timeout=end - now if now < end else DRAIN_TIMEOUT)
        if not events and now >= end:
            raise RuntimeError(f"{in_flight} requests got no answer within {DRAIN_TIMEOUT:g} s")
        for key, _ in events:
            conn = key.data
            try:
                count = conn.sock.recv_into(buffer)
            except BlockingIOError:
                continue
            if not count:
                errors += 1
                in_flight -= 1
                selector.unregister(conn.sock)
                continue
            if conn.body_left is None:
                conn.header += view[:count]
                mark = conn.header.find(b"\r\n\r\n")
                if mark < 0:
                    continue
                status, length = _parse_head(conn.header[:mark])
                statuses[status] = statuses.get(status, 0) + 1
                conn.body_left = length - (len(conn.header) - mark - 4)
            else:
                conn.body_left -= count
            if conn.body_left > 0:
                continue
            done = time.perf_counter()
            if done <= end:
                latencies.append(done - conn.started)
                send(conn)
            else:
                in_flight -= 1
    return latencies, statuses, errors, time.perf_counter() - begin


def run_load(port, method, path, connections, seconds, body_prefix=None):
    """Drive `connections` keep-alive sockets for `seconds`; returns counts and latencies.

    body_prefix set: every request POSTs a distinct small module (tag = prefix + counter)
    to path + "/<counter>.wasm".
    """
    selector = selectors.DefaultSelector()
    counter = 0

    def request_bytes():
        nonlocal counter
        counter += 1
        if body_prefix is None:
            return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode()
        body = wasm_module(f"{body_prefix}-{counter}")
        return (f"{method} {path}/{counter}.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    conns = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        selector.register(sock, selectors.EVENT_READ, conn)
        conns.append(conn)
    latencies, statuses, errors, elapsed = drive(conns, selector, request_bytes, seconds)
    for conn in conns:
        conn.sock.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
    }


def _read_response(sock, pending=b""):
    """Read one response from a blocking socket: (status, leftover bytes)."""
    data = pending
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status, length = _parse_head(head)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        rest += chunk
    return status, rest[length:]


def post_worker(port, path, body_prefix, functions=0):
    """Persistent POST client: for each line "N" on stdin, POST N distinct modules on one
    keep-alive connection and print {"seconds", "latencies", "statuses"} as one JSON line."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    counter, pending = 0, b""
    for line in sys.stdin:
        latencies, statuses = [], {}
        begin = time.perf_counter()
        for _ in range(int(line)):
            counter += 1
            body = post_module(f"{body_prefix}-{counter}", functions)
            started = time.perf_counter()
            sock.sendall((f"POST {path}/{counter}.wasm HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            status, pending = _read_response(sock, pending)
            latencies.append(time.perf_counter() - started)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        print(json.dumps({"seconds": time.perf_counter() - begin, "latencies": latencies,
                          "statuses": statuses}), flush=True)
    sock.close()


def _percentile(sorted_values, fraction):
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def loadgen(port, method, path, connections, seconds, body_prefix=None):
    """Run the load generator in a separate process; returns its result dict."""
    spec = json.dumps({"port": port, "method": method, "path": path, "connections": connections,
                       "seconds": seconds, "body_prefix": body_prefix})
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--loadgen", spec],
                            capture_output=True, text=True, timeout=seconds + 120)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------ servers

class _MemoryHandler(http.server.BaseHTTPRequestHandler):
    """The baseline: the smallest reasonable http.server handler serving bytes from memory."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/wasm")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args):
        pass


def _start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass                     # the load generator resets its connections at the end


def _baseline_server(body):
    handler = type("MemoryHandler", (_MemoryHandler,), {"body": body})
    return _QuietServer(("127.0.0.1", 0), handler)


class ServerProcess:
    """``python http_server.py --root ROOT --port 0 --quiet ARGS`` as a child process, its compile
    cache under cache_home (XDG_CACHE_HOME); WASMSTORE_* variables of this environment are not
    passed on. .port once it listens; .listening: seconds from spawning to that."""

    def __init__(self, root, cache_home, extra_args=()):
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("WASMSTORE_")}
        env["XDG_CACHE_HOME"] = cache_home
        self.lines = queue.Queue()
        self.spawned = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, HTTP_SERVER, "--root", root, "--port",
                                         "0", "--quiet", *extra_args], env=env, cwd=REPO_DIR,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.stderr = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.port, self.listening = self._wait_listening()

    def _read_stderr(self):
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_listening(self):
        """(port, seconds from spawning to the "serving ... on URL" line)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError("http_server.py did not start listening: "
                                   + " | ".join(self.stderr[-5:]))
            match = SERVING_RE.match(line)
            if match:
                return int(match.group(1).rsplit(":", 1)[1]), time.perf_counter() - self.spawned
            self.stderr.append(line)

    def cpu_seconds(self):
        """CPU time (user + system) used so far by the server's live processes: the command's
        own and its descendants' (worker processes, kvhost's guest processes)."""
        return sum(_process_cpu(pid) for pid in _process_tree(self.process.pid))

    def stop(self):
        """SIGTERM (a graceful shutdown), then SIGKILL if it has not ended within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _process_tree(pid):
    """pid and the pids of all its live descendants (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                pending += [int(child) for child in f.read().split()]
        except OSError:                      # ended meanwhile
            pass
    return found


def _process_cpu(pid):
    """User + system CPU seconds of one process (0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks():
    """(busy, total) clock ticks of all the machine's CPUs so far (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)        # idle and iowait are not busy


def wrk(url, seconds, connections, script=None, threads=1):
    """One run of wrk (a C load generator: it takes little of the CPU it measures) against url;
    {"requests", "seconds", "rate", "p50_ms", "p99_ms", "bad", "cpu"} where bad counts non-2xx
    answers and socket errors, and cpu is wrk's own CPU seconds."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
               "--timeout", "10s"]
    if script is not None:
        command += ["-s", script]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command + [url], capture_output=True, text=True,
                            timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = result.stdout
    count, rate = WRK_COUNT_RE.search(out), WRK_RATE_RE.search(out)
    if result.returncode != 0 or count is None or rate is None:
        raise RuntimeError(f"wrk failed: {(result.stderr or out).strip()[-300:]}")
    percentiles = {int(level): float(value) * WRK_UNITS[unit] * 1000
                   for level, value, unit in WRK_PERCENTILE_RE.findall(out)}
    bad = sum(int(n) for n in WRK_NON_2XX_RE.findall(out))
    errors = WRK_ERRORS_RE.search(out)
    if errors is not None:
        bad += sum(int(n) for n in errors.groups())
    return {"requests": int(count.group(1)),
            "seconds": float(count.group(2)) * WRK_UNITS[count.group(3)],
            "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "rate": float(rate.group(1)), "p50_ms": percentiles.get(50, float("nan")),
            "p99_ms": percentiles.get(99, float("nan")), "bad": bad}


# ------------------------------------------------------------------------------ figures

def bench_get(store, rounds, seconds):
    """Alternating rounds of GET 100 KB over 8 connections: wasmstore server vs baseline."""
    import http_server
    module = wasm_module("bench-get", padding=GET_BODY_SIZE - 20)
    store.add("bench/get.wasm", module)
    server = http_server.make_server(store, "127.0.0.1", 0, quiet=True)
    baseline = _baseline_server(module)
    _start(server)
    _start(baseline)
    ours, theirs = [], []
    try:
        for srv, path in ((server, "/api/v1/module/bench/get.wasm"), (baseline, "/")):
            loadgen(srv.server_address[1], "GET", path, GET_CONNECTIONS, 0.5)   # warm-up, untimed
        for number in range(rounds):
            order = [("ours", server), ("base", baseline)]
            if number % 2:
                order.reverse()
            for name, srv in order:
                result = loadgen(srv.server_address[1], "GET", "/api/v1/module/bench/get.wasm",
                                 GET_CONNECTIONS, seconds)
                if set(result["statuses"]) != {"200"} or result["errors"]:
                    raise RuntimeError(f"GET benchmark saw {result['statuses']}, "
                                       f"{result['errors']} errors")
                (ours if name == "ours" else theirs).append(result)
    finally:
        server.graceful_shutdown(grace=5)
        baseline.shutdown()
        baseline.server_close()
    return ours, theirs, len(module)


def bench_post(root_parent, rounds, seconds, functions=0):
    """Per round: in-process Store.add into one fresh store and HTTP POSTs into another,
    alternating in blocks of POST_BLOCK until each side has run `seconds`; modules with
    `functions` functions of code (0: function-less)."""
    import http_server
    import wasmstore
    inproc, http = [], []
    for number in range(rounds):
        local = wasmstore.Store(tempfile.mkdtemp(dir=root_parent))
        served = wasmstore.Store(tempfile.mkdtemp(dir=root_parent))
        server = http_server.make_server(served, "127.0.0.1", 0, quiet=True)
        _start(server)
        spec = json.dumps({"port": server.port, "path": f"/api/v1/module/bench/r{number}",
                           "body_prefix": f"h{number}", "functions": functions})
        worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--post-worker",
                                   spec],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        local_lat, http_lat, local_time, http_time, statuses = [], [], 0.0, 0.0, {}
        try:
            counter = 0
            while local_time < seconds or http_time < seconds:
                begin = time.perf_counter()
                for _ in range(POST_BLOCK):
                    counter += 1
                    started = time.perf_counter()
                    local.add(f"bench/r{number}/{counter}.wasm",
                              post_module(f"l{number}-{counter}", functions))
                    local_lat.append(time.perf_counter() - started)
                local_time += time.perf_counter() - begin
                worker.stdin.write(f"{POST_BLOCK}\n")
                worker.stdin.flush()
                line = worker.stdout.readline()
                if not line:
                    raise RuntimeError("the POST client process died")
                block = json.loads(line)
                http_time += block["seconds"]
                http_lat += block["latencies"]
                for status, count in block["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + count
        finally:
            worker.stdin.close()
            worker.wait(30)
            server.graceful_shutdown(grace=5)
        if set(statuses) != {"200"}:
            raise RuntimeError(f"POST benchmark saw statuses {statuses}")
        inproc.append(_summary(local_lat, local_time))
        http.append(_summary(http_lat, http_time))
    return inproc, http


def numbers_wasm():
    """guests/run/numbers.wat as a binary module (add(i32, i32) -> i32 and friends: what a user
    would store and call)."""
    import wasmtime
    with open(NUMBERS_WAT, encoding="utf-8") as f:
        return bytes(wasmtime.wat2wasm(f.read()))


ADD_SCRIPT = ('wrk.method = "POST"\nwrk.body = "[2,3]"\n'
              'wrk.headers["Content-Type"] = "application/json"\n')
WORKERS_REQUESTS = {      # name -> (path, whether it is the POST of ADD_SCRIPT, expected body)
    "GET": ("/api/v1/module/bench/small.wasm", False, None),
    "call": ("/api/v1/call/add/bench/numbers.wasm", True, b"5"),
}


def _check_answer(port, path, post, expected):
    """One request on its own connection; RuntimeError unless it answers 200 (and `expected`)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST" if post else "GET", path, body=b"[2,3]" if post else None,
                     headers={"Content-Type": "application/json"} if post else {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or (expected is not None and body != expected):
        raise RuntimeError(f"{path} answered {response.status} {body[:200]!r}")


def bench_workers(parent, rounds, seconds):
    """Per round and request (GET of a ~1 KB module, a warm call of add(2, 3)): wrk against a
    server of one worker process and one of two, started once on the same store (the one not
    measured idles), in alternating order; and the one-worker server on one connection
    (workers "one": no threads contend for its GIL). Returns {request: {workers: [wrk
    results]}}, each result with "cpu_us": the server's CPU time (all its processes) per
    request, and the cores of the server, wrk and the machine's other processes."""
    import wasmstore
    root = os.path.join(parent, "workers")
    store = wasmstore.Store(root)
    store.add("bench/small.wasm", wasm_module("bench-small", padding=WORKERS_SMALL_SIZE - 23))
    store.add("bench/numbers.wasm", numbers_wasm())
    script = os.path.join(parent, "add.lua")
    with open(script, "w", encoding="utf-8") as f:
        f.write(ADD_SCRIPT)
    servers = {}
    try:
        for workers in (1, 2):
            servers[workers] = ServerProcess(root, os.path.join(parent, "cache"),
                                             ["--workers", str(workers)])
        for server in servers.values():               # warm-up, untimed: every worker loads add
            for path, post, expected in WORKERS_REQUESTS.values():
                _check_answer(server.port, path, post, expected)
                wrk(f"http://127.0.0.1:{server.port}{path}", min(seconds, 1.0),
                    WORKERS_CONNECTIONS, script if post else None)
        results = {name: {1: [], 2: [], "one": []} for name in WORKERS_REQUESTS}
        for number in range(rounds):
            for name, (path, post, _) in WORKERS_REQUESTS.items():
                for workers in ((1, 2, "one") if number % 2 == 0 else ("one", 2, 1)):
                    server = servers[1 if workers == "one" else workers]
                    connections = 1 if workers == "one" else WORKERS_CONNECTIONS
                    cpu, (busy, total) = server.cpu_seconds(), machine_ticks()
                    result = wrk(f"http://127.0.0.1:{server.port}{path}", seconds,
                                 connections, script if post else None)
                    cpu = server.cpu_seconds() - cpu
                    busy_after, total_after = machine_ticks()
                    result["cpu_us"] = 1e6 * cpu / max(1, result["requests"])
                    result["cores"] = cpu / result["seconds"]
                    result["wrk_cores"] = result["cpu"] / result["seconds"]
                    busy_share = (busy_after - busy) / max(1, total_after - total)
                    result["idle"] = 1 - busy_share
                    result["other_cores"] = max(0.0, busy_share * os.cpu_count()
                                                - result["cores"] - result["wrk_cores"])
                    if result["bad"]:
                        raise RuntimeError(f"{name} with {workers} workers: {result['bad']} "
                                           "answers were not 200 or failed")
                    results[name][workers].append(result)
    finally:
        for server in servers.values():
            server.stop()
    return results


def _summary(latencies, seconds):
    latencies = sorted(latencies)
    return {"requests": len(latencies), "seconds": seconds, "rate": len(latencies) / seconds,
            "p50_ms": 1000 * _percentile(latencies, 0.5),
            "p99_ms": 1000 * _percentile(latencies, 0.99)}


# --------------------------------------------------------------------------------- table

def _median(results, key):
    return statistics.median(r[key] for r in results)


def paired_ratio(ours, base):
    """Median over rounds of ours/base measured back to back in the same round: the machine's
    load drifts between rounds far more than within one (other jobs share the cores)."""
    return statistics.median(o["rate"] / b["rate"] for o, b in zip(ours, base))


def _row(label, ours, base, goal=None):
    ratio = paired_ratio(ours, base)
    verdict = "" if goal is None else ("met" if ratio >= goal else "MISSED")
    return ratio, (f"{label:<34} {_median(ours, 'rate'):>10.0f} {_median(base, 'rate'):>10.0f} "
                   f"{ratio:>7.2f}  >= {goal:.1f} {verdict}")


def _latency_row(label, results):
    return (f"  {label:<32} p50 {_median(results, 'p50_ms'):7.2f} ms   "
            f"p99 {_median(results, 'p99_ms'):7.2f} ms")


def print_table(raw, size, rounds, seconds, out=sys.stdout):
    """The GET and POST figures of `raw` (main's results; either may be missing)."""
    out.write(f"\nhttp_server.py benchmark: medians of {rounds} alternating rounds of "
              f"{seconds:g} s "
              "each\n\n")
    out.write("ratio = median of the per-round ratios (each round measures both, back to back)\n\n")
    out.write(f"{'figure':<34} {'wasmstore':>10} {'baseline':>10} {'ratio':>7}  goal\n")
    out.write("-" * 78 + "\n")
    per_round = []
    if "get_wasmstore" in raw:
        get_ours, get_base = raw["get_wasmstore"], raw["get_baseline"]
        _, line = _row(f"GET {size // 1024} KB x {GET_CONNECTIONS} conns (req/s)", get_ours,
                       get_base, GOAL_RATIO)
        out.write(line + "\n")
        out.write(_latency_row("wasmstore GET", get_ours) + "\n")
        out.write(_latency_row("baseline (http.server, memory)", get_base) + "\n")
        per_round += [("GET ours", get_ours), ("GET base", get_base)]
    for suffix, label in (("", "POST small module"),
                          ("_code", f"POST {POST_FUNCTIONS} functions")):
        if "post_http" + suffix not in raw:
            continue
        post_http, post_inproc = raw["post_http" + suffix], raw["add_inprocess" + suffix]
        _, line = _row(f"{label}, 1 client (/s)", post_http, post_inproc, GOAL_RATIO)
        out.write(line + "\n")
        out.write(_latency_row("wasmstore POST", post_http) + "\n")
        out.write(_latency_row("baseline (in-process Store.add)", post_inproc) + "\n")
        per_round += [("POST http" + suffix, post_http), ("add" + suffix, post_inproc)]
    out.write("\nper round (req/s): " + " | ".join(
        f"{label} " + ", ".join(f"{r['rate']:.0f}" for r in results)
        for label, results in per_round) + "\n")


def print_workers_table(results, rounds, seconds, out=sys.stdout):
    """The workers figure; returns {request: ratio of 2 workers over 1}."""
    out.write(f"\nworkers: wrk -t1 -c{WORKERS_CONNECTIONS}, {seconds:g} s per run, {rounds} "
              "alternating rounds; requests/s of --workers 2 over --workers 1 (one process)\n\n")
    out.write(f"{'request':<30} {'1 worker':>10} {'2 workers':>10} {'ratio':>7}  goal"
              f"{'':<14} CPU/request 1 | 2\n")
    out.write("  (cores: CPU seconds per second of the run, of the server (all its processes), of "
              "wrk, and of every other process of the machine; idle: the share of its "
              f"{os.cpu_count()} CPUs no process used)\n")
    out.write("-" * 96 + "\n")
    labels = {"GET": f"GET of a {WORKERS_SMALL_SIZE // 1024} KB module (req/s)",
              "call": "warm call of add(2, 3) (req/s)"}
    ratios = {}
    for name, by_workers in results.items():
        one, two = by_workers[1], by_workers[2]
        ratio = ratios[name] = paired_ratio(two, one)
        verdict = "met" if ratio >= WORKERS_GOAL else "MISSED"
        out.write(f"{labels[name]:<30} {_median(one, 'rate'):>10.0f} {_median(two, 'rate'):>10.0f} "
                  f"{ratio:>7.2f}  >= {WORKERS_GOAL:.1f} {verdict:<7} "
                  f"{_median(one, 'cpu_us'):>6.0f} | {_median(two, 'cpu_us'):.0f} us\n")
        out.write(f"  p50/p99 ms: 1 worker {_median(one, 'p50_ms'):.2f}/"
                  f"{_median(one, 'p99_ms'):.2f}, 2 workers {_median(two, 'p50_ms'):.2f}/"
                  f"{_median(two, 'p99_ms'):.2f}; per round "
                  "(req/s 1 | 2): " + ", ".join(f"{a['rate']:.0f} | {b['rate']:.0f}"
                                               for a, b in zip(one, two)) + "\n")
        out.write("  cores, 1 | 2 workers: " + "; ".join(
            f"{label} {_median(one, key):.2f} | {_median(two, key):.2f}"
            for label, key in (("server", "cores"), ("wrk", "wrk_cores"),
                               ("other jobs", "other_cores")))
            + f"; idle {100 * _median(one, 'idle'):.0f}% | {100 * _median(two, 'idle'):.0f}%\n")
        single = by_workers.get("one")
        if single:
            out.write(f"  1 worker on 1 connection (no thread waits for its GIL): "
                      f"{_median(single, 'rate'):.0f} req/s, {_median(single, 'cpu_us'):.0f} us "
                      f"CPU/request, {_median(single, 'cores'):.2f} cores\n")
    return ratios


# ---------------------------------------------------------------------------------- main

FIGURES = ("get", "post", "workers")


def _build_parser():
    parser = argparse.ArgumentParser(prog="bench.py http",
                                     description="REST API throughput and latency vs same-run "
                                                 "baselines.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds per figure (median)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="duration of each measurement")
    parser.add_argument("--only", action="append", choices=FIGURES,
                        help="measure only this figure (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    return parser


def main(argv=None):
    args = _build_parser().parse_args(argv)
    if args.rounds < 1 or not args.seconds > 0:
        sys.stderr.write("bench.py http: error: --rounds >= 1 and --seconds > 0 please\n")
        return 2
    figures = args.only or FIGURES
    if "workers" in figures and shutil.which("wrk") is None:
        sys.stderr.write("bench.py http: error: the workers figure needs wrk "
                         "(apt-get install wrk; .ci/run installs it)\n")
        return 2
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import wasmstore
    parent = tempfile.mkdtemp(prefix="wasmstore-bench-http-")
    raw = {}
    try:
        if "get" in figures:
            store = wasmstore.Store(os.path.join(parent, "get"))
            raw["get_wasmstore"], raw["get_baseline"], _ = bench_get(store, args.rounds,
                                                                     args.seconds)
        if "post" in figures:
            raw["add_inprocess"], raw["post_http"] = bench_post(parent, args.rounds, args.seconds)
            raw["add_inprocess_code"], raw["post_http_code"] = bench_post(
                parent, args.rounds, args.seconds, POST_FUNCTIONS)
        if "workers" in figures:
            raw["workers"] = bench_workers(parent, args.rounds, args.seconds)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    if "get" in figures or "post" in figures:
        print_table(raw, GET_BODY_SIZE, args.rounds, args.seconds)
    if "workers" in figures:
        print_workers_table(raw["workers"], args.rounds, args.seconds)
    if args.json:
        print(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        print(json.dumps(run_load(**json.loads(sys.argv[2]))))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--post-worker":
        post_worker(**json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
