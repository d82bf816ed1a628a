# SPDX-License-Identifier: Apache-2.0
"""bench_kv.py: the kvhost figures (run it as ``python bench.py kv``).

Figures, each the median of --rounds rounds, ratios taken against a baseline in the same run:

- exists: a WAT component (guests/host/kv-probe.wat, ``exists-loop``) calling
  wasi:keyvalue ``[method]bucket.exists`` in a loop, memory backend: host calls/s (goal
  >= 35,000), and its ratio to a core module calling an equivalent Python host function
  (``wasmtime.Linker.define_func``, reading the key from guest memory, same backend call).
- sqlite: ``set-get-loop`` (one set and one get per iteration, each its own transaction) from
  a guest on the SQLite backend, against raw ``sqlite3`` running the same transactions from
  Python on a file with the same pragmas: pairs/s and ratio (goal >= 60%). Guest and raw run
  in alternating blocks of 100 pairs (one guest call per block), so both see the same noise.
- redis: the same loop on the Redis backend (a real redis-server started on a free loopback
  port, or --redis-url), against raw RESP SET + GET round trips on one socket (goal >= 70%);
  also, for information, against the same RedisBackend object called from Python (what the
  guest call itself costs). Both sides make the same two round trips per pair with the same
  100-byte value, in alternating blocks. The ratio depends on the round-trip latency of the
  machine (on a loaded or virtualised host a round trip can be 4x slower, which hides the fixed
  cost of a guest call), so the added cost per pair in microseconds is printed too: that is
  the figure to compare between runs.
- provider: the same ``set-get-loop`` (100-byte values) with the guest's wasi:keyvalue served by
  the WAT provider guests/kv-provider.wat over the memory backend, against the same
  guest on the memory backend directly, in alternating blocks: pairs/s and ratio (goal >= 0.6);
  also the componentize-py provider build/py-provider.wasm (``bash guests/build.sh``; skipped
  with a message if it is missing). In-process (isolation="thread"), so the figure is the cost
  of forwarding, not of a worker's IPC; the provider's instance is made once per guest call
  (one block of 100 pairs). Beside the wall-clock ratio, the CPU time per pair of each side
  (time.thread_time, same blocks), which other processes on a loaded machine do not move.
- large: the same ``set-get-loop`` with a 1 MiB value on the memory backend: MB/s through set
  and get (each pair moves 2 MiB: the value into the host and back), from the time of a call of
  8 pairs less that of a call of none (the value's trip in as the call's argument), goal >= 100
  MB/s; and the largest value a guest may pass (kvhost.GUEST_VALUE_LIMIT), set and got back.
  Beside it, what of a pair is kvhost's own bulk conversion (a 1 Mi-element list of wasmtime's
  32-byte value records filled and read back, as get and set do) and the allocation of those
  records by wasmtime's C API (timed alone; over glibc's mmap threshold, so fresh pages each
  time); the rest is wasmtime's C API, which copies each byte as one such value. Also the
  MB/s of a 256 KiB value.
- counter: 8 threads, each running a guest that increments one SQLite counter N times;
  the final value must be exactly 8 x N (exit status 1 otherwise).
- warm start: ``python kvhost.py call --kv memory: build/py-counter.wasm bump`` as a new
  process, its compile cache already filled (goal <= 0.5 s), against a new process that only
  imports wasmtime (the floor any wasmtime-py program pays). Needs the componentize-py guest
  (``bash guests/build.sh``); skipped with a message otherwise.

Map: guest and baselines; one function per figure; the table and ``main``.
"""

__version__ = "0.1.0"
__all__ = ["main"]

import argparse
import ctypes
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
import kvhost    # noqa: E402  (the repository root is not on sys.path when loaded by file)
import wasmtime  # noqa: E402

PROBE = os.path.join(REPO_DIR, "guests", "host", "kv-probe.wat")
PY_COUNTER = os.path.join(REPO_DIR, "build", "py-counter.wasm")
KV_PROVIDER = os.path.join(REPO_DIR, "guests", "kv-provider.wat")
PY_PROVIDER = os.path.join(REPO_DIR, "build", "py-provider.wasm")
# A core module calling one imported host function in a loop: the core-module baseline.
CORE_LOOP = """(module
  (import "kv" "exists" (func $exists (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "key")
  (func (export "loop") (param $n i32) (result i32)
    (local $hits i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $hits (i32.add (local.get $hits) (call $exists (i32.const 16) (i32.const 3))))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $hits)))"""
VALUE = b"v" * 100
BLOCK = 100        # set+get pairs per timed block; guest and raw blocks alternate


def median_rate(rounds, work, count):
    """Median of `rounds` timings of work(); returned as operations per second."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


# -- exists: component host calls vs core-module host calls ------------------------------------

def bench_exists(rounds, calls):
    host = kvhost.Host(kv="memory:", cache_dir=False, timeout=None)
    guest = host.load(PROBE)
    host.backend.set("default", "b", "key", b"1")
    component = lambda: host.call(guest, "exists-loop", ["b", "key", calls])

    backend = host.backend
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, CORE_LOOP)
    linker = wasmtime.Linker(engine)
    memory_box = []

    def exists(ptr, length):
        key = memory_box[0].read(store, ptr, ptr + length).decode("utf-8")
        return int(backend.exists("default", "b", key))
    linker.define_func("kv", "exists", wasmtime.FuncType([wasmtime.ValType.i32()] * 2, [wasmtime.ValType.i32()]),
                       exists)
    instance = linker.instantiate(store, module)
    memory_box.append(instance.exports(store)["memory"])
    loop = instance.exports(store)["loop"]
    core = lambda: loop(store, calls)

    assert component() == calls and core() == calls
    component_rates, core_rates = [], []
    for _ in range(rounds):            # alternate, so both see the same machine noise
        component_rates.append(median_rate(1, component, calls))
        core_rates.append(median_rate(1, core, calls))
    host.close()
    comp, base = statistics.median(component_rates), statistics.median(core_rates)
    return {"component calls/s": comp, "core-module calls/s": base, "ratio": comp / base}


# -- sqlite: guest set+get vs raw sqlite3 --------------------------------------------------------

def raw_sqlite_pairs(path):
    """The transactions the SQLite backend runs for set + get, done directly from Python."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,"
               " value BLOB NOT NULL, PRIMARY KEY (ns, bucket, key)) WITHOUT ROWID")

    def work(pairs):
        for _ in range(pairs):     # autocommit: each statement is its own transaction
            db.execute("INSERT OR REPLACE INTO kv (ns, bucket, key, value) VALUES (?, ?, ?, ?)",
                       ("default", "b", "key", VALUE))
            db.execute("SELECT value FROM kv WHERE ns=? AND bucket=? AND key=?", ("default", "b", "key")).fetchone()
    return work, db.close


def interleaved(rounds, pairs, guest_work, raw_work, cpu=None):
    """Median pairs/s of guest and raw, timed in alternating blocks so both share the machine's
    noise. `cpu`, a dict, gets the median CPU microseconds per pair of this thread on each side
    ("guest", "raw"): steadier than wall time on a loaded machine when no other process works
    for either side."""
    guest_work(BLOCK), raw_work(BLOCK)      # warm up
    guest_rates, raw_rates, guest_cpu, raw_cpu = [], [], [], []
    for _ in range(rounds):
        guest_time = raw_time = guest_busy = raw_busy = 0.0
        for _ in range(max(1, pairs // BLOCK)):
            start, start_busy = time.perf_counter(), time.thread_time()
            guest_work(BLOCK)
            middle, middle_busy = time.perf_counter(), time.thread_time()
            raw_work(BLOCK)
            raw_time += time.perf_counter() - middle
            raw_busy += time.thread_time() - middle_busy
            guest_time += middle - start
            guest_busy += middle_busy - start_busy
        done = max(1, pairs // BLOCK) * BLOCK
        guest_rates.append(done / guest_time)
        raw_rates.append(done / raw_time)
        guest_cpu.append(guest_busy / done * 1e6)
        raw_cpu.append(raw_busy / done * 1e6)
    if cpu is not None:
        cpu.update(guest=statistics.median(guest_cpu), raw=statistics.median(raw_cpu))
    return statistics.median(guest_rates), statistics.median(raw_rates)


def bench_sqlite(rounds, pairs, directory):
    host = kvhost.Host(kv="sqlite:" + os.path.join(directory, "guest.sqlite3"), cache_dir=False, timeout=None)
    guest = host.load(PROBE)
    value = list(VALUE)
    raw_work, close = raw_sqlite_pairs(os.path.join(directory, "raw.sqlite3"))
    g, r = interleaved(rounds, pairs, lambda n: host.call(guest, "set-get-loop", ["b", "key", value, n]), raw_work)
    close()
    host.close()
    return {"guest pairs/s": g, "raw sqlite3 pairs/s": r, "ratio": g / r}


# -- redis: guest set+get vs raw RESP ------------------------------------------------------------

def start_redis(directory):
    server = shutil.which("redis-server")
    if server is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", directory],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    process.kill()
    return None, None


def raw_resp_pairs(url):
    """SET + GET round trips of the same key and value on one plain socket."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 6379))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    setup = ([["AUTH"] + ([parts.username] if parts.username else []) + [parts.password]] if parts.password else [])
    setup += [["SELECT", parts.path.lstrip("/")]] if parts.path.lstrip("/") not in ("", "0") else []
    for command in setup:
        sock.sendall(b"*%d\r\n" % len(command) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in command))
        reply = reader.readline()
        if not reply.startswith(b"+"):
            raise RuntimeError(f"redis refused {command[0]}: {reply.decode(errors='replace').strip()}")
    key = "raw:default:b:key"

    def work(pairs):
        # Commands are encoded per request, as any client must (the key and value vary), and
        # replies are checked as minimally as a correct client can (an error reply must not pass).
        for _ in range(pairs):
            name = key.encode("utf-8")
            sock.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(name), name, len(VALUE), VALUE))
            if reader.readline() != b"+OK\r\n":
                raise RuntimeError("redis refused SET")
            sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name))
            header = reader.readline()
            if header[:1] != b"$":
                raise RuntimeError(f"unexpected GET reply {header[:40]!r}")
            reader.read(int(header[1:]) + 2)

    def close():
        reader.close()
        sock.close()
    return work, close


def bench_redis(rounds, pairs, url):
    host = kvhost.Host(kv=url, cache_dir=False, timeout=None)
    guest = host.load(PROBE)
    value = list(VALUE)
    raw_work, close = raw_resp_pairs(url)
    guest_work = lambda n: host.call(guest, "set-get-loop", ["b", "key", value, n])
    g, r = interleaved(rounds, pairs, guest_work, raw_work)
    close()
    backend = host.backend

    def direct_work(n):   # the same backend object called from Python: isolates the guest-call cost
        for _ in range(n):
            backend.set("default", "b", "key", VALUE)
            backend.get("default", "b", "key")
    g2, d = interleaved(rounds, pairs, guest_work, direct_work)
    host.close()
    return {"guest pairs/s": g, "raw RESP pairs/s": r, "ratio": g / r, "direct pairs/s": d, "direct ratio": g2 / d,
            "added us/pair": 1e6 / g - 1e6 / r}


# -- provider: set+get through a provider component vs the backend directly ----------------------

def bench_provider(rounds, pairs, provider, cache_dir):
    """kv-probe's set-get-loop served by `provider` over memory: vs the same guest on memory: directly."""
    direct = kvhost.Host(kv="memory:", cache_dir=False, timeout=None)
    layered = kvhost.Host(kv=kvhost.Provider(provider), provider_kv="memory:", cache_dir=cache_dir, timeout=None,
                          isolation="thread")
    try:
        direct_guest, layered_guest = direct.load(PROBE), layered.load(PROBE)
        value = list(VALUE)
        cpu = {}
        g, d = interleaved(rounds, pairs, lambda n: layered.call(layered_guest, "set-get-loop", ["b", "key", value, n]),
                           lambda n: direct.call(direct_guest, "set-get-loop", ["b", "key", value, n]), cpu)
        if layered.backend.get("default", "wat.b" if provider == KV_PROVIDER else "py.b", "key") != VALUE:
            raise RuntimeError(f"{provider} did not write through to its backend")
    finally:
        direct.close()
        layered.close()
    return {"provider pairs/s": g, "direct pairs/s": d, "ratio": g / d, "added us/pair": 1e6 / g - 1e6 / d,
            "cpu us/pair": cpu["guest"], "direct cpu us/pair": cpu["raw"]}


# -- large: a 1 MiB value through set and get, and the largest value -----------------------------

LARGE_VALUE = bytes(range(256)) * 4096      # 1 MiB
LARGE_PAIRS = 8


def bench_large(rounds):
    """MB/s of set+get of a 1 MiB value from a guest (both directions counted), and a round
    trip of the largest value a guest may pass."""
    host = kvhost.Host(kv="memory:", cache_dir=False, timeout=None)
    guest = host.load(PROBE)
    argument = list(LARGE_VALUE)

    def seconds(pairs, value=argument):
        started = time.perf_counter()
        host.call(guest, "set-get-loop", ["b", "large", value, pairs])
        return time.perf_counter() - started
    per_pair = []
    for _ in range(rounds):
        per_pair.append((seconds(LARGE_PAIRS) - seconds(0)) / LARGE_PAIRS)
    if host.backend.get("default", "b", "large") != LARGE_VALUE:
        raise RuntimeError("the 1 MiB value did not arrive whole")
    smaller = LARGE_VALUE[:len(LARGE_VALUE) // 4]
    small_pair = statistics.median(
        (seconds(LARGE_PAIRS * 4, list(smaller)) - seconds(0, list(smaller))) / (LARGE_PAIRS * 4)
        for _ in range(rounds))
    largest = (LARGE_VALUE * 3)[:kvhost.GUEST_VALUE_LIMIT]
    key = "k" * kvhost.MAX_KEY_BYTES
    started = time.perf_counter()
    host.call(guest, "set", ["b", key, list(largest)])
    got = host.call(guest, "get", ["b", key])
    largest_seconds = time.perf_counter() - started
    host.close()
    if bytes(got["ok"]) != largest:
        raise RuntimeError("the largest value did not come back whole")
    pair = statistics.median(per_pair)
    return {"MB/s": 2 * len(LARGE_VALUE) / pair / 1e6, "pair s": pair, "largest": len(largest),
            "largest s": largest_seconds, "conversion s": conversion_seconds(rounds, LARGE_VALUE),
            "256 KiB MB/s": 2 * len(smaller) / small_pair / 1e6}


def conversion_seconds(rounds, value):
    """Median seconds of kvhost's own share of one set+get of `value`, and of the allocation it
    asks wasmtime's C API for: (allocation, conversion). A list of u8 value records is allocated
    (get's result) and freed again; then allocated, filled and read back (set's argument)."""
    c = kvhost._C
    record = bytearray(kvhost._VAL_SIZE)
    address = (ctypes.c_char * len(record)).from_buffer(record)
    payload = ctypes.addressof(address) + kvhost._VAL_PAYLOAD
    allocations, conversions = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        c.seq_new["list"](payload, len(value))
        c.seq_delete["list"](payload)
        middle = time.perf_counter()
        c.seq_new["list"](payload, len(value))
        data = kvhost._vec_at(payload)[1]
        kvhost._store_u8_vals(data, value)
        back = kvhost._u8_vals_at(data, len(value))
        c.seq_delete["list"](payload)
        allocations.append(middle - started)
        conversions.append(time.perf_counter() - middle - allocations[-1])
        if back != value:
            raise RuntimeError("kvhost's conversion did not give the value back")
    return statistics.median(allocations), statistics.median(conversions)


# -- counter: 8 threads, one SQLite counter ------------------------------------------------------

def bench_counter(threads, increments, directory):
    host = kvhost.Host(kv="sqlite:" + os.path.join(directory, "counter.sqlite3"), cache_dir=False, timeout=None)
    guest = host.load(PROBE)
    errors = []

    def work():
        try:
            host.call(guest, "incr-loop", ["b", "counter", increments])
        except kvhost.KvError as e:
            errors.append(str(e))
    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    final = int(host.backend.get("default", "b", "counter") or b"0")
    host.close()
    return {"expected": threads * increments, "final": final, "increments/s": threads * increments / elapsed,
            "errors": errors}


# -- warm start: a new process running the 18 MB componentize-py guest --------------------------

def bench_warm_start(rounds, directory):
    """Median seconds of a whole `kvhost.py call` process with a filled cache, and of the floor."""
    cache = os.path.join(directory, "compile-cache")
    call = [sys.executable, os.path.join(REPO_DIR, "kvhost.py"), "call", "--kv", "memory:", "--cache-dir", cache,
            PY_COUNTER, "bump"]
    floor = [sys.executable, "-c", "import wasmtime"]

    def seconds(command):
        start = time.perf_counter()
        output = subprocess.run(command, check=True, capture_output=True, cwd=REPO_DIR).stdout
        elapsed = time.perf_counter() - start
        if command is call and output.strip() != b'{"ok":1}':
            raise RuntimeError(f"unexpected answer from the guest: {output[:80]!r}")
        return elapsed
    cold = seconds(call)            # compiles and fills the cache
    warm, base = [], []
    for _ in range(max(rounds, 5)):     # alternate, so both see the same machine noise
        warm.append(seconds(call))
        base.append(seconds(floor))
    return {"cold s": cold, "warm s": statistics.median(warm), "floor s": statistics.median(base)}


# -- table and main ------------------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(prog="bench.py kv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median reported)")
    parser.add_argument("--quick", action="store_true", help="smaller loops (a smoke test)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting redis-server")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    calls, pairs, increments = (5_000, 500, 100) if args.quick else (50_000, 5_000, 500)
    directory = tempfile.mkdtemp(prefix="bench-kv-")
    process = None
    status = 0
    try:
        exists = bench_exists(args.rounds, calls)
        print(f"exists   component host calls/s   {exists['component calls/s']:>10,.0f}   (goal >= 35,000: "
              f"{'met' if exists['component calls/s'] >= 35_000 else 'MISSED'})")
        print(f"         core-module host calls/s {exists['core-module calls/s']:>10,.0f}   "
              f"ratio component/core {exists['ratio']:.2f}")
        sqlite = bench_sqlite(args.rounds, pairs, directory)
        print(f"sqlite   guest set+get pairs/s    {sqlite['guest pairs/s']:>10,.0f}   raw sqlite3 "
              f"{sqlite['raw sqlite3 pairs/s']:,.0f}   ratio {sqlite['ratio']:.0%} (goal >= 60%: "
              f"{'met' if sqlite['ratio'] >= 0.6 else 'MISSED'})")
        url = args.redis_url
        if url is None:
            process, url = start_redis(directory)
        if url is None:
            print("redis    skipped: redis-server is not installed (apt-get install -y redis-server)")
        else:
            redis = bench_redis(args.rounds, pairs, url)
            print(f"redis    guest set+get pairs/s    {redis['guest pairs/s']:>10,.0f}   raw RESP "
                  f"{redis['raw RESP pairs/s']:,.0f}   ratio {redis['ratio']:.0%} (goal >= 70%: "
                  f"{'met' if redis['ratio'] >= 0.7 else 'MISSED'})")
            print(f"         (guest adds {redis['added us/pair']:,.0f} us per set+get to the raw round trips; "
                  f"same RedisBackend called from Python: {redis['direct pairs/s']:,.0f} pairs/s; "
                  f"guest/direct {redis['direct ratio']:.0%})")
        layer = bench_provider(args.rounds, pairs, KV_PROVIDER, False)
        print(f"provider WAT provider set+get pairs/s {layer['provider pairs/s']:>10,.0f}   same guest on memory: "
              f"{layer['direct pairs/s']:,.0f}   ratio {layer['ratio']:.2f} (goal >= 0.6: "
              f"{'met' if layer['ratio'] >= 0.6 else 'MISSED'}); adds {layer['added us/pair']:,.1f} us per pair")
        print(f"         CPU per pair {layer['cpu us/pair']:.1f} us, on memory: {layer['direct cpu us/pair']:.1f} us: "
              f"ratio {layer['direct cpu us/pair'] / layer['cpu us/pair']:.2f} (the same ratio without the "
              "machine's noise)")
        if not os.path.exists(PY_PROVIDER):
            print("         componentize-py provider skipped: build/py-provider.wasm is missing "
                  "(pip install componentize-py==0.25.1 && bash guests/build.sh)")
        else:
            py = bench_provider(args.rounds, pairs, PY_PROVIDER, os.path.join(directory, "compile-cache"))
            print(f"         componentize-py provider     {py['provider pairs/s']:>10,.0f}   same guest on memory: "
                  f"{py['direct pairs/s']:,.0f}   ratio {py['ratio']:.2f}; adds {py['added us/pair']:,.1f} us per pair")
        large = bench_large(args.rounds)
        print(f"large    1 MiB value through set+get {large['MB/s']:>7,.1f} MB/s ({large['pair s'] * 1e3:.0f} ms "
              f"per pair; goal >= 100 MB/s: {'met' if large['MB/s'] >= 100 else 'MISSED'}); the largest "
              f"value a guest may pass, {large['largest']:,} bytes with a 4 KiB key, set and got back in "
              f"{large['largest s']:.2f} s")
        allocation, conversion = large["conversion s"]
        print(f"         of each pair kvhost's bulk conversion {conversion * 1e3:.0f} ms and the "
              f"records' allocation (by wasmtime's C API, fresh pages) {allocation * 1e3:.0f} ms; "
              f"wasmtime's C API (a 32-byte value per byte) the rest; a 256 KiB value "
              f"{large['256 KiB MB/s']:,.1f} MB/s")
        counter = bench_counter(8, increments, directory)
        exact = counter["final"] == counter["expected"] and not counter["errors"]
        print(f"counter  8 threads x {increments} increments on one SQLite counter: final {counter['final']}"
              f" (expected {counter['expected']}: {'exact' if exact else 'WRONG'}), "
              f"{counter['increments/s']:,.0f} increments/s")
        if not exact:
            print(f"         errors: {counter['errors'][:3]}")
            status = 1
        if not os.path.exists(PY_COUNTER):
            print("start    skipped: build/py-counter.wasm is missing (pip install componentize-py==0.25.1 "
                  "&& bash guests/build.sh)")
        else:
            start = bench_warm_start(args.rounds, directory)
            print(f"start    warm start of py-counter.wasm in a new process {start['warm s']:.2f} s (goal <= 0.5 s: "
                  f"{'met' if start['warm s'] <= 0.5 else 'MISSED'}); cold {start['cold s']:.1f} s; "
                  f"a process that only imports wasmtime {start['floor s']:.2f} s")
    finally:
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(directory, True)
    return status


if __name__ == "__main__":
    sys.exit(main())
