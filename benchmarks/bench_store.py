# SPDX-License-Identifier: Apache-2.0
"""bench_store.py: the store figures (run it as ``python bench.py store``).

Figures, each the median of --rounds rounds, ratios taken against a baseline in the same run:

- W1: 1,000 small modules added one commit each, durably, in-process, into a fresh store:
  adds/s, and the ratio to dulwich doing the same work (blob, nested trees, commit, ref update
  per add, with dulwich's default durability). wasmstore and dulwich rounds alternate.
- W1b: 300 small modules added one commit each, durably, spread over ten directories
  (``d0`` .. ``d9``): adds/s and the ratio to dulwich doing the same work in the same run.
  Unlike W1, no tree grows big, so the figure is the per-commit cost itself (objects, syncs,
  ref update, validation) rather than the serialisation of one large directory. The main
  workload is modules with code (10 functions, ~200 bytes, as a compiler emits them: each one
  is validated); modules of a custom section alone, which flatter validation, are beside it.
- validate: the durable add of modules with 10, 200 and 2,000 functions (~0.2, 3.6 and 38
  KB) against ``wasmtime.Module.validate`` of the same bytes and the add of a module of the
  same size without code (the commit's own cost), interleaved; goal: add <= 2 x validator +
  commit for the 2,000-function module.
- W2: the same adds into a store already holding 10,000 paths in 100 directories: the ratio
  of its per-add cost to W1's (a commit must cost O(depth), not O(store size)).
- W3: warm ``find`` by path (lookups/s); ``versions`` of a path changed 10 times inside 5,000
  commits, cold (new Store object on the root) and warm (second call), and cold without the
  history cache (``cache/history`` removed): the figure that justifies keeping that cache.
- W4: ``fsck`` and ``gc`` of a 10,000-module store: seconds, tracemalloc peak and RSS growth
  (ru_maxrss in a fresh subprocess), with small modules and with modules 10x bigger: the
  memory must not grow with the bytes of the modules.
- A 50 MB module: ``add_file``, ``add`` (bytes) and ``find``, each in a fresh subprocess: RSS
  growth over the subprocess's baseline, divided by the module size (goal < 3).
- Bulk import: ``python wasmstore.py import DIR`` of 1,000 modules in one commit: modules/s.
- Component add: ``add_file`` of build/py-counter.wasm (18 MB, componentize-py) into a fresh
  store, which checks it in full, against a full compile of it by wasmtime (the baseline:
  what checking by plain compiling would cost) in the same run.

Map: sizes and module bytes; setup helpers (stores built without fsync: setup needs no
durability); the measured sections (one function per figure); the subprocess worker
(``--worker``, used for RSS figures); the table and ``main``.

Temporary data lives under /tmp and is removed at the end. dulwich is needed only here: it is
imported from the environment or installed on demand into .bench/site-packages (ignored by
git), never a project dependency.
"""

__version__ = "0.1.0"
__all__ = ["main", "DULWICH_REQUIREMENT"]

import argparse
import collections
import contextlib
import cProfile
import gc
import importlib.util
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WASMSTORE_FILE = os.path.join(REPO_DIR, "wasmstore.py")
PRIVATE_SITE = os.path.join(REPO_DIR, ".bench", "site-packages")
DULWICH_REQUIREMENT = "dulwich==1.2.21"
WASM_HEADER = b"\0asm\x01\0\0\0"

FULL = types.SimpleNamespace(
    adds=1000, spread_adds=300, spread_dirs=10, prefill_dirs=100, prefill_per_dir=100,
    lookups=100_000,
    history_commits=5000, history_changes=10, history_dirs=100,
    gc_modules=10_000, gc_small_bytes=2048, gc_factor=10, gc_commits=10,
    big_module_bytes=50 << 20, import_modules=1000, import_module_bytes=1024)
QUICK = types.SimpleNamespace(
    adds=100, spread_adds=100, spread_dirs=10, prefill_dirs=10, prefill_per_dir=100,
    lookups=10_000,
    history_commits=500, history_changes=10, history_dirs=10,
    gc_modules=1000, gc_small_bytes=2048, gc_factor=10, gc_commits=2,
    big_module_bytes=5 << 20, import_modules=100, import_module_bytes=1024)
ADD_BLOCK = 50          # W1/W2 runs alternate every ADD_BLOCK adds to share the noise
W1B_FUNCTIONS = 10      # W1b's main workload: modules with code (a module without is beside it)
VALIDATE_SIZES = (10, 200, 2000)    # functions per module in the validation figure
VALIDATE_ADDS = 20      # durable adds per size and round in the validation figure
SECTIONS = ("w1", "w1b", "validate", "w2", "w3", "w4", "big", "import", "component")


class BenchFailure(Exception):
    """The benchmark could not run (setup failed); str() is a one-line message."""


# --------------------------------------------------------------------------- modules

def _leb(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def module_bytes(tag, size=0):
    """A valid core module: the header plus one custom section holding tag (distinct per
    module), padded so the whole module is about size bytes."""
    tag = tag.encode() if isinstance(tag, str) else tag
    name = b"bench"
    payload = _leb(len(name)) + name + tag
    padding = max(0, size - len(WASM_HEADER) - len(payload) - 6)
    payload += b"\xa5" * padding
    return WASM_HEADER + b"\0" + _leb(len(payload)) + payload


def _section(section_id, payload):
    return bytes([section_id]) + _leb(len(payload)) + payload


def code_module_bytes(tag, functions):
    """A valid core module with code, as compilers emit it: `functions` functions of type
    (i32) -> i32, each adding a constant, calling the one before it and multiplying (about
    19 bytes of code each: 10 functions make ~200 bytes, 2,000 make ~38 KB), the first one
    exported, and a custom section holding tag (distinct per module)."""
    tag = tag.encode() if isinstance(tag, str) else tag
    types = _section(1, b"\x01\x60\x01\x7f\x01\x7f")
    declared = _section(3, _leb(functions) + b"\x00" * functions)
    exports = _section(7, b"\x01\x02f0\x00\x00")
    bodies = bytearray(_leb(functions))
    for index in range(functions):
        code = b"\x00\x20\x00\x41" + _leb(index * 7 + 1) + b"\x6a"     # local.get 0 + k
        if index:
            code += b"\x10" + _leb(index - 1)                              # call the previous
        code += b"\x41\x03\x6c\x20\x00\x73\x0b"                          # * 3, ^ arg, end
        bodies += _leb(len(code)) + code
    custom = _section(0, _leb(5) + b"bench" + tag)
    return WASM_HEADER + types + declared + exports + _section(10, bytes(bodies)) + custom


def write_module_file(filename, size, tag_size=16):
    """Write a module of about size bytes with random content; returns the offset of a
    tag_size-byte tag that _retag() rewrites to make each use a distinct module."""
    name = b"bench"
    payload_size = len(_leb(len(name))) + len(name) + size
    head = WASM_HEADER + b"\0" + _leb(payload_size) + _leb(len(name)) + name
    with open(filename, "wb") as handle:
        handle.write(head)
        remaining = size
        while remaining:
            chunk = min(remaining, 4 << 20)
            handle.write(os.urandom(chunk))
            remaining -= chunk
    return len(head)


def _retag(filename, offset, tag):
    with open(filename, "r+b") as handle:
        handle.seek(offset)
        handle.write(tag.encode().ljust(16, b"_")[:16])


def _write_tree(directory, files):
    """files: {relative path: bytes}; plain writes (setup data)."""
    for relative, data in files.items():
        filename = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(filename), exist_ok=True)
        with open(filename, "wb") as handle:
            handle.write(data)


# --------------------------------------------------------------------------- setup helpers

def load_wasmstore(filename=WASMSTORE_FILE):
    """The project's wasmstore.py (or `filename`), loaded by file path (the benchmark may run
    from anywhere)."""
    module = sys.modules.get("wasmstore")
    if module is not None and os.path.abspath(getattr(module, "__file__", "")) == filename:
        return module
    spec = importlib.util.spec_from_file_location("wasmstore", filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules["wasmstore"] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def without_fsync():
    """Setup data needs no durability: skipping fsync builds the big stores in seconds.

    Never active while a figure is measured."""
    saved = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None
    try:
        yield
    finally:
        os.fsync, os.fdatasync = saved


def _progress(text):
    sys.stderr.write(f"  {text}\n")
    sys.stderr.flush()


def _median(values):
    return statistics.median(values)


def _import_dulwich(allow_install):
    """The dulwich package (installing it privately on demand), or None and why not."""
    for attempt in range(2):
        if os.path.isdir(PRIVATE_SITE) and PRIVATE_SITE not in sys.path:
            sys.path.insert(0, PRIVATE_SITE)
        try:
            import dulwich.objects   # noqa: F401
            import dulwich.repo      # noqa: F401
            return sys.modules["dulwich"], None
        except ImportError:
            pass
        if attempt or not allow_install:
            break
        _progress(f"installing {DULWICH_REQUIREMENT} into .bench/site-packages "
                  "(for this benchmark only; never a project dependency)")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", PRIVATE_SITE, DULWICH_REQUIREMENT],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            return None, f"pip install {DULWICH_REQUIREMENT} failed: {last}"
    return None, (f"dulwich is not installed: pip install {DULWICH_REQUIREMENT} "
                  "(or run without --no-install)")


# --------------------------------------------------------------------------- W1 / W2: adds

def spread_paths(directories, count):
    """(directory, file name) of each add: round-robin over directories."""
    return [(directories[index % len(directories)], f"m{index + 1:04d}.wasm")
            for index in range(count)]


class WasmstoreAdder:
    """Adds modules one commit each (paths from spread_paths), block by block."""

    def __init__(self, ws, root, modules, directories):
        self.store = ws.Store(root)
        self.items = [(f"{directory}/{name}", data) for (directory, name), data
                      in zip(spread_paths(directories, len(modules)), modules)]
        self.commits_before = self.store.commit_count()
        self.added = 0

    def add_block(self, start, stop):
        """Add items[start:stop] durably; returns the seconds it took."""
        add = self.store.add
        began = time.perf_counter()
        for path, data in self.items[start:stop]:
            add(path, data)
        elapsed = time.perf_counter() - began
        self.added += stop - start
        return elapsed

    def close(self):
        """Check that every add made exactly one commit (the figure counts real work)."""
        made = self.store.commit_count() - self.commits_before
        self.store.close()
        if made != self.added:
            raise BenchFailure(f"{self.added} adds made {made} commits in {self.store.root}")


class DulwichAdder:
    """The same work with dulwich: per add a blob, the directory tree, the root tree, a
    commit and a compare-and-swap ref update, with dulwich's default durability (it
    fsyncs the ref, not the objects)."""

    REF = b"refs/heads/master"

    def __init__(self, dulwich, repo_dir, modules, directories):
        from dulwich.objects import ZERO_SHA, Tree
        from dulwich.repo import Repo
        self.repo = Repo.init(repo_dir, mkdir=True)
        self.modules = modules
        self.paths = spread_paths(directories, len(modules))
        self.subtrees = {directory: Tree() for directory in directories}
        self.root = Tree()
        self.head = self.zero = ZERO_SHA

    def add_block(self, start, stop):
        from dulwich.objects import Blob, Commit
        objects = self.repo.object_store
        began = time.perf_counter()
        for index in range(start, stop):
            directory, name = self.paths[index]
            blob = Blob.from_string(self.modules[index])
            objects.add_object(blob)
            subtree = self.subtrees[directory]
            subtree.add(name.encode(), 0o100644, blob.id)
            objects.add_object(subtree)
            root = self.root
            root.add(directory.encode(), 0o040000, subtree.id)
            objects.add_object(root)
            commit = Commit()
            commit.tree = root.id
            commit.parents = [] if self.head == self.zero else [self.head]
            commit.author = commit.committer = b"wasmstore <bench@localhost>"
            commit.author_time = commit.commit_time = int(time.time())
            commit.author_timezone = commit.commit_timezone = 0
            commit.message = f"Import /{directory}/{name}\n".encode()
            objects.add_object(commit)
            if not self.repo.refs.set_if_equals(self.REF, self.head, commit.id):
                raise BenchFailure("dulwich ref update lost a race")
            self.head = commit.id
        return time.perf_counter() - began

    def close(self):
        self.repo.close()


def build_prefilled(ws, root, work, cfg):
    """A store holding prefill_dirs x prefill_per_dir paths (import_tree, no fsync)."""
    source = os.path.join(work, "prefill-source")
    files = {f"p{d:03d}/m{m:04d}.wasm": module_bytes(f"prefill-{d}-{m}")
             for d in range(cfg.prefill_dirs) for m in range(cfg.prefill_per_dir)}
    _write_tree(source, files)
    with without_fsync(), ws.Store(root) as store:
        store.import_tree(source)
    shutil.rmtree(source)
    return sorted(files)


def bench_adds(ws, cfg, rounds, work, dulwich, prefilled_root, sections):
    """W1 wasmstore, W1 dulwich and W2, interleaved in blocks of ADD_BLOCK adds (rotating
    order) so that all three share the machine's noise; returns {run: [seconds/round]}."""
    modules = [module_bytes(f"w1-{index}") for index in range(cfg.adds)]
    times = collections.defaultdict(list)
    for round_number in range(rounds):
        scratch = tempfile.mkdtemp(prefix="adds-", dir=work)
        adders = {}
        if "w1" in sections:
            adders["wasmstore"] = WasmstoreAdder(ws, os.path.join(scratch, "w1"), modules,
                                                 ["w1"])
            if dulwich is not None:
                adders["dulwich"] = DulwichAdder(dulwich, os.path.join(scratch, "git"),
                                                 modules, ["w1"])
        if "w2" in sections:
            distinct = [module_bytes(f"w2-{round_number}-{index}") for index in range(cfg.adds)]
            adders["w2"] = WasmstoreAdder(ws, prefilled_root, distinct,
                                          [f"w1-round{round_number + 1}"])
        _run_interleaved(adders, cfg.adds, round_number, times)
        shutil.rmtree(scratch)
    return times


def bench_spread_adds(ws, cfg, rounds, work, dulwich, functions=W1B_FUNCTIONS):
    """W1b: spread_adds adds over spread_dirs directories, wasmstore and dulwich interleaved
    like W1, of modules with `functions` functions of code (0: a custom section alone);
    returns {run: [seconds/round]}."""
    modules = [code_module_bytes(f"w1b-{index}", functions) if functions
               else module_bytes(f"w1b-{index}") for index in range(cfg.spread_adds)]
    directories = [f"d{index}" for index in range(cfg.spread_dirs)]
    times = collections.defaultdict(list)
    for round_number in range(rounds):
        scratch = tempfile.mkdtemp(prefix="spread-", dir=work)
        adders = {"wasmstore": WasmstoreAdder(ws, os.path.join(scratch, "w1b"), modules,
                                              directories)}
        if dulwich is not None:
            adders["dulwich"] = DulwichAdder(dulwich, os.path.join(scratch, "git"), modules,
                                             directories)
        _run_interleaved(adders, cfg.spread_adds, round_number, times)
        shutil.rmtree(scratch)
    return times


def bench_validation(ws, work, rounds):
    """Per size in VALIDATE_SIZES: the seconds of a durable add of a module with that many
    functions, of wasmtime.Module.validate of the same bytes, and of a durable add of a
    module of the same size without code (the commit's own cost), interleaved; returns
    {functions: {"add": [...], "validate": [...], "commit": [...], "bytes": size}}."""
    import wasmtime
    engine = wasmtime.Engine()
    results = {}
    for functions in VALIDATE_SIZES:
        measured = results[functions] = collections.defaultdict(list)
        for round_number in range(rounds):
            coded = [code_module_bytes(f"v{round_number}-{i}", functions)
                     for i in range(VALIDATE_ADDS)]
            plain = [module_bytes(f"p{round_number}-{i}", len(coded[0]))
                     for i in range(VALIDATE_ADDS)]
            root = tempfile.mkdtemp(prefix="validate-", dir=work)
            with ws.Store(os.path.join(root, "s")) as store:
                spent = collections.Counter()
                for index, (code, blank) in enumerate(zip(coded, plain)):
                    spent["add"] += _seconds(store.add, f"c/m{index}.wasm", code)
                    spent["validate"] += _seconds(wasmtime.Module.validate, engine, code)
                    spent["commit"] += _seconds(store.add, f"p/m{index}.wasm", blank)
            shutil.rmtree(root)
            for key, seconds in spent.items():
                measured[key].append(seconds / VALIDATE_ADDS)
        measured["bytes"] = len(coded[0])
        _progress(f"validation, {functions} functions: add {_median(measured['add']) * 1e3:.2f} "
                  f"ms, validate {_median(measured['validate']) * 1e3:.2f} ms")
    return results


def _seconds(function, *args):
    began = time.perf_counter()
    function(*args)
    return time.perf_counter() - began


def _run_interleaved(adders, count, round_number, times):
    """Run every adder over count adds in blocks of ADD_BLOCK, rotating the order."""
    spent = dict.fromkeys(adders, 0.0)
    names = list(adders)
    for block, start in enumerate(range(0, count, ADD_BLOCK)):
        shift = (block + round_number) % len(names)
        for name in names[shift:] + names[:shift]:
            spent[name] += adders[name].add_block(start, min(start + ADD_BLOCK, count))
    for name, adder in adders.items():
        adder.close()
        times[name].append(spent[name])
    _progress(f"round {round_number + 1}: " + ", ".join(
        f"{name} {count / seconds:.1f} adds/s" for name, seconds in spent.items()))


def count_file_operations(ws, work, count):
    """Counts of the os calls wasmstore makes per add (a separate, untimed run of W1b-style
    adds over ten directories)."""
    names = ("open", "fsync", "fdatasync", "rename", "replace", "stat", "fstat", "mkdir",
             "unlink", "link", "write", "pwrite", "pread", "read", "ftruncate", "listdir")
    counts = collections.Counter()
    lock = threading.Lock()
    saved = {name: getattr(os, name) for name in names}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            with lock:
                counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    root = tempfile.mkdtemp(prefix="opcount-", dir=work)
    modules = [module_bytes(f"ops-{index}") for index in range(count + 1)]
    with ws.Store(root) as store:
        store.add("w1/warmup.wasm", modules[0])
        for name in names:
            setattr(os, name, counting(name, saved[name]))
        try:
            for index, data in enumerate(modules[1:]):
                store.add(f"d{index % 10}/m{index + 1:04d}.wasm", data)
        finally:
            for name, function in saved.items():
                setattr(os, name, function)
    shutil.rmtree(root)
    return {name: counts[name] / count for name in names if counts[name]}


def profile_adds(ws, work, count):
    """cProfile of count adds (printed to stderr, for finding where time goes)."""
    root = tempfile.mkdtemp(prefix="profile-", dir=work)
    modules = [module_bytes(f"profile-{index}") for index in range(count)]
    profiler = cProfile.Profile()
    with ws.Store(root) as store:
        profiler.enable()
        for index, data in enumerate(modules):
            store.add(f"w1/m{index + 1:04d}.wasm", data)
        profiler.disable()
    shutil.rmtree(root)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    sys.stderr.write(f"\ncProfile of {count} wasmstore adds (sorted by own time):\n")
    sys.stderr.write(out.getvalue())


# --------------------------------------------------------------------------- W3: reads

def bench_find(ws, root, paths, lookups, rounds):
    """Warm find by path: lookups/s per round."""
    rates = []
    with ws.Store(root) as store:
        for path in paths:                      # warm: every tree and module cached
            store.find(path)
        for _ in range(rounds):
            sequence = [paths[index % len(paths)] for index in range(lookups)]
            start = time.perf_counter()
            for path in sequence:
                store.find(path)
            rates.append(lookups / (time.perf_counter() - start))
            _progress(f"find: {rates[-1]:,.0f} lookups/s")
    return rates


def build_history(ws, root, cfg):
    """history_commits commits; "v/target.wasm" changes history_changes times among them,
    every other commit adds a module in one of history_dirs directories (no fsync)."""
    every = cfg.history_commits // cfg.history_changes
    with without_fsync(), ws.Store(root) as store:
        for index in range(cfg.history_commits):
            if index % every == 0:
                store.add("v/target.wasm", module_bytes(f"target-{index}"))
            else:
                store.add(f"f/d{index % cfg.history_dirs:03d}/m{index:05d}.wasm",
                          module_bytes(f"filler-{index}"))
        if store.commit_count() != cfg.history_commits:
            raise BenchFailure("history store has the wrong number of commits")
    return "v/target.wasm"


def bench_versions(ws, root, path, expected, rounds, history_cache=True):
    """versions(path): ms of the first call on a new Store object (cold) and the second.
    history_cache=False: cache/history is removed first (versions then diffs the trees of
    every commit, and writes no cache back): what the cache saves."""
    cold, warm = [], []
    for _ in range(rounds):
        if not history_cache:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, "cache", "history"))
        with ws.Store(root) as store:
            start = time.perf_counter()
            first = store.versions(path)
            cold.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            second = store.versions(path)
            warm.append((time.perf_counter() - start) * 1000)
        if len(first) != expected or first != second:
            raise BenchFailure(f"versions returned {len(first)} entries, expected {expected}")
        _progress(f"versions{'' if history_cache else ' without the history cache'}: "
                  f"cold {cold[-1]:.1f} ms, warm {warm[-1]:.1f} ms")
    return cold, warm


# --------------------------------------------------------------------------- W4: gc, fsck

def build_gc_store(ws, root, work, cfg, module_size, label):
    """gc_modules modules of module_size bytes, imported in gc_commits commits (no fsync)."""
    per_commit = cfg.gc_modules // cfg.gc_commits
    with without_fsync(), ws.Store(root) as store:
        for batch in range(cfg.gc_commits):
            source = os.path.join(work, f"gc-source-{label}-{batch}")
            files = {f"d{(index // 100):03d}/m{index:05d}.wasm":
                     module_bytes(f"gc-{label}-{batch}-{index}", module_size)
                     for index in range(per_commit)}
            _write_tree(source, files)
            store.import_tree(source, f"b{batch:02d}")
            shutil.rmtree(source)


def make_garbage(ws, root, tag):
    """One module added then removed: gc has a history to squash and objects to delete."""
    with ws.Store(root) as store:
        store.add("garbage/x.wasm", module_bytes(f"garbage-{tag}"))
        store.remove("garbage")


def bench_maintenance(ws, root, operation, rounds, tag):
    """fsck or gc in fresh subprocesses: seconds, RSS growth (KiB), tracemalloc peak."""
    results = collections.defaultdict(list)
    for round_number in range(rounds):
        for measure in ("rss", "tracemalloc"):
            if operation == "gc":
                make_garbage(ws, root, f"{tag}-{round_number}-{measure}")
            report = run_worker({"op": operation, "root": root, "measure": measure})
            if measure == "rss":
                results["seconds"].append(report["seconds"])
                results["rss_growth"].append(report["peak_kib"] - report["baseline_kib"])
            else:
                results["traced_peak"].append(report["traced_peak"])
            if operation == "gc" and measure == "rss" and report["result"] < 1:
                raise BenchFailure("gc deleted nothing although garbage was made")
            if operation == "fsck" and report["result"]:
                raise BenchFailure(f"fsck found problems: {report['result'][:3]}")
    return results


def directory_bytes(root):
    total = 0
    for parent, _, files in os.walk(root):
        total += sum(os.lstat(os.path.join(parent, name)).st_size for name in files)
    return total


# --------------------------------------------------------------------------- subprocess worker

# Linux records the parent's RSS high-water mark in a child's ru_maxrss at exec (the old
# mm of a vfork), so a worker started straight from this (big) process would report this
# process's peak. A tiny launcher in between keeps the worker's ru_maxrss its own.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def run_worker(task):
    """Run one measured operation in a fresh interpreter; returns its JSON report."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable,
                           os.path.abspath(__file__), "--worker", json.dumps(task)],
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchFailure(f"worker {task['op']} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux


def _reset_rss_peak():
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0), so the
    peak after an operation is that operation's, not an earlier transient (imports)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker(task):
    """The subprocess side: baseline RSS after imports, Store open and a warm validator,
    then one operation; reports ru_maxrss before/after and the seconds it took."""
    ws = load_wasmstore()
    store = ws.Store(task["root"])
    ws.validate_module(module_bytes("warm-up"))   # wasmtime loaded before the baseline
    gc.collect()
    peak_reset = _reset_rss_peak()
    baseline = _max_rss_kib()
    if task.get("measure") == "tracemalloc":
        tracemalloc.start()
    start = time.perf_counter()
    result = _run_operation(store, task)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else None
    report = {"seconds": seconds, "baseline_kib": baseline, "peak_kib": _max_rss_kib(),
              "traced_peak": traced_peak, "result": result, "peak_reset": peak_reset}
    store.close()
    print(json.dumps(report))
    return 0


def _run_operation(store, task):
    op = task["op"]
    if op == "fsck":
        return store.fsck()
    if op == "gc":
        return store.gc()
    if op == "add_file":
        return store.add_file(task["path"], task["file"])
    if op == "add_bytes":
        with open(task["file"], "rb") as handle:
            data = handle.read()
        return store.add(task["path"], data)
    if op == "find":
        return len(store.find(task["path"]))
    raise ValueError(f"unknown worker operation {op!r}")


# --------------------------------------------------------------------------- big module, import

def bench_big_module(ws, work, cfg, rounds):
    """add_file, add (bytes) and find of a big module, each in a fresh subprocess.

    Each add stores a distinct module (a tag inside it changes), so every add writes its
    object for real. Returns {operation: [RSS growth / module size per round]}."""
    root = os.path.join(work, "big-store")
    ws.Store(root).close()
    source = os.path.join(work, "big.wasm")
    tag_offset = write_module_file(source, cfg.big_module_bytes)
    size = os.path.getsize(source)
    ratios = collections.defaultdict(list)
    baselines = []
    for round_number in range(rounds):
        for op in ("add_file", "add_bytes", "find"):
            path = "big/file.wasm" if op == "find" else f"big/{op}-{round_number}.wasm"
            if op != "find":
                _retag(source, tag_offset, f"{op}-{round_number}")
            else:
                _retag(source, tag_offset, f"find-{round_number}")
                with ws.Store(root) as store:        # the module find reads back
                    store.add_file(path, source)
            report = run_worker({"op": op, "root": root, "file": source, "path": path})
            growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
            ratios[op].append(growth / size)
            baselines.append(report["baseline_kib"])
            _progress(f"{size / 2**20:.0f} MB module {op}: RSS +{growth / 2**20:.1f} MiB "
                      f"over a {report['baseline_kib'] / 1024:.1f} MiB baseline "
                      f"= {growth / size:.2f}x the module, {report['seconds']:.2f} s")
    return ratios, size, _median(baselines)


def bench_import(ws, work, cfg, rounds):
    """`python wasmstore.py import DIR` of import_modules modules into a fresh root:
    modules/s of the whole command, and of Store.import_tree in-process."""
    source = os.path.join(work, "import-source")
    files = {f"d{index % 10}/m{index:04d}.wasm":
             module_bytes(f"import-{index}", cfg.import_module_bytes)
             for index in range(cfg.import_modules)}
    _write_tree(source, files)
    cli_rates, library_rates = [], []
    for round_number in range(rounds):
        root = os.path.join(work, f"import-cli-{round_number}")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, WASMSTORE_FILE, "--root", root, "import", source],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode or f"imported {cfg.import_modules} modules" not in done.stdout:
            raise BenchFailure(f"import failed: {(done.stderr or done.stdout).strip()[:200]}")
        cli_rates.append(cfg.import_modules / seconds)
        shutil.rmtree(root)
        root = os.path.join(work, f"import-lib-{round_number}")
        with ws.Store(root) as store:
            start = time.perf_counter()
            store.import_tree(source)
            library_rates.append(cfg.import_modules / (time.perf_counter() - start))
        shutil.rmtree(root)
        _progress(f"import: CLI {cli_rates[-1]:.0f} modules/s, "
                  f"Store.import_tree {library_rates[-1]:.0f} modules/s")
    shutil.rmtree(source)
    return cli_rates, library_rates


def bench_component_add(ws, work, rounds):
    """add_file of build/py-counter.wasm into fresh stores and full wasmtime compiles of it:
    ([seconds per add], [seconds per compile]), or None when the guest is not built."""
    source = os.path.join(REPO_DIR, "build", "py-counter.wasm")
    if not os.path.exists(source):
        return None
    import wasmtime
    import wasmtime.component
    with open(source, "rb") as handle:
        data = handle.read()
    adds, compiles = [], []
    for round_number in range(rounds):
        root = os.path.join(work, f"component-{round_number}")
        with ws.Store(root) as store:
            start = time.perf_counter()
            store.add_file("py-counter.wasm", source)
            adds.append(time.perf_counter() - start)
        shutil.rmtree(root)
        start = time.perf_counter()
        wasmtime.component.Component(wasmtime.Engine(), data)
        compiles.append(time.perf_counter() - start)
        _progress(f"component: add {adds[-1]:.2f} s, full compile {compiles[-1]:.2f} s")
    return adds, compiles


# --------------------------------------------------------------------------- report

class Table:
    """Rows of (figure, median, goal, verdict); verdict None = informational."""

    def __init__(self):
        self.rows = []

    def add(self, figure, value, goal="", passed=None):
        verdict = "" if passed is None else ("yes" if passed else "NO")
        self.rows.append((figure, value, goal, verdict))

    @property
    def missed(self):
        return [row[0] for row in self.rows if row[3] == "NO"]

    def render(self):
        header = ("figure", "median", "goal", "pass?")
        widths = [max(len(row[column]) for row in self.rows + [header]) for column in range(4)]
        lines = []
        for index, row in enumerate([header] + self.rows):
            lines.append("  ".join(cell.ljust(widths[column])
                                   for column, cell in enumerate(row)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines)


def _kib(value):
    return f"{value / 1024:.1f} MiB" if value >= 1024 else f"{value:.0f} KiB"


def _report_adds(table, cfg, times, dulwich_note, label="W1", count=None, goal=1.2):
    count = count or cfg.adds
    if times.get("wasmstore"):
        ws_rate = count / _median(times["wasmstore"])
        table.add(f"{label} wasmstore adds/s ({count} adds, durable)", f"{ws_rate:,.1f}")
        if times.get("dulwich"):
            du_rate = count / _median(times["dulwich"])
            pair_ratios = [d / w for w, d in zip(times["wasmstore"], times["dulwich"])]
            ratio = _median(pair_ratios)
            table.add(f"{label} dulwich adds/s (same work, same run)", f"{du_rate:,.1f}")
            table.add(f"{label} ratio wasmstore/dulwich (median of round pairs)", f"{ratio:.2f}",
                      f">= {goal}", ratio >= goal)
        else:
            table.add(f"{label} ratio wasmstore/dulwich", "not measured", f">= {goal}", None)
            _progress(f"{label} dulwich skipped: {dulwich_note}")
    if times.get("w2"):
        table.add(f"W2 adds/s into a {cfg.prefill_dirs * cfg.prefill_per_dir:,}-path store",
                  f"{cfg.adds / _median(times['w2']):,.1f}")
        if times.get("wasmstore"):
            ratio = _median([w2 / w1 for w1, w2 in zip(times["wasmstore"], times["w2"])])
            table.add("W2 per-add cost / W1 per-add cost", f"{ratio:.2f}", "<= 1.3",
                      ratio <= 1.3)


def _report_validation(table, results):
    """Each size's durable add, validator and commit cost; the goal: an add costs at most
    twice the validator plus the commit's own cost."""
    for functions, measured in results.items():
        add, validate, commit = (_median(measured[key]) for key in ("add", "validate", "commit"))
        goal = add <= 2 * validate + commit
        table.add(f"durable add of a {functions}-function module ({measured['bytes']:,} B)",
                  f"{add * 1e3:.2f} ms (validator {validate * 1e3:.2f} ms, commit of a "
                  f"module without code {commit * 1e3:.2f} ms)",
                  "<= 2 x validator + commit" if functions == max(results) else "",
                  goal if functions == max(results) else None)


def _report_maintenance(table, label, results, total_bytes):
    for operation in ("fsck", "gc"):
        data = results[operation]
        table.add(f"W4 {operation} ({label}, {total_bytes / 2**20:.0f} MiB of objects)",
                  f"{_median(data['seconds']):.2f} s, RSS +{_kib(_median(data['rss_growth']))}, "
                  f"traced peak {_median(data['traced_peak']) / 2**20:.1f} MiB")


def _report_memory_growth(table, small, big, small_bytes, big_bytes):
    """Pass when the extra module bytes add under 5% of themselves to the peaks."""
    extra = big_bytes - small_bytes
    for operation in ("fsck", "gc"):
        traced = _median(big[operation]["traced_peak"]) - _median(small[operation]["traced_peak"])
        rss = (_median(big[operation]["rss_growth"]) -
               _median(small[operation]["rss_growth"])) * 1024
        worst = max(traced, rss)
        table.add(f"W4 {operation} memory growth per extra module byte (10x modules)",
                  f"{worst / extra:.3f} (traced {traced / 2**20:+.1f} MiB, "
                  f"RSS {rss / 2**20:+.1f} MiB for +{extra / 2**20:.0f} MiB)",
                  "< 0.05 (flat)", worst / extra < 0.05)


# --------------------------------------------------------------------------- main

def _build_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py store",
        description="Store benchmarks (W1-W4, 50 MB module, bulk import). "
                    "Each figure is the median of --rounds rounds.")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller workloads (a smoke test: seconds, not minutes; "
                             "never installs dulwich)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--no-install", action="store_true",
                        help=f"do not pip install {DULWICH_REQUIREMENT} when it is missing")
    parser.add_argument("--file-ops", action="store_true",
                        help="also count the os calls per add (untimed run)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of W1 wasmstore adds to stderr")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a goal is missed (default: report only)")
    parser.add_argument("--wasmstore", metavar="FILE", default=WASMSTORE_FILE,
                        help="measure this wasmstore.py instead (e.g. another checkout's, for a "
                             "before/after in one time window)")
    return parser


def main(argv=None):
    """Run the store benchmarks, print the table; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(json.loads(argv[1]))
    args = _build_parser().parse_args(argv)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or args.rounds < 1:
        problem = f"unknown section {unknown[0]!r}" if unknown else "--rounds must be >= 1"
        sys.stderr.write(f"bench.py store: error: {problem}\n")
        return 2
    cfg = QUICK if args.quick else FULL
    try:
        table = run(args, cfg, set(sections))
    except BenchFailure as exc:
        sys.stderr.write(f"bench.py store: error: {exc}\n")
        return 1
    print(f"\nwasmstore store benchmarks ({'quick' if args.quick else 'full'} run, "
          f"median of {args.rounds} rounds, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus)")
    print(table.render())
    if table.missed:
        print(f"\ngoals missed: {', '.join(table.missed)}")
    return 1 if args.check and table.missed else 0


def run(args, cfg, sections):
    ws = load_wasmstore(os.path.abspath(args.wasmstore))
    table = Table()
    rounds = args.rounds
    with tempfile.TemporaryDirectory(prefix="wasmstore-bench-", dir="/tmp") as work:
        dulwich, dulwich_note = None, "W1 not run"
        if sections & {"w1", "w1b"}:
            dulwich, dulwich_note = _import_dulwich(not (args.no_install or args.quick))
        prefilled_root = os.path.join(work, "prefilled")
        prefill_paths = []
        if sections & {"w2", "w3"}:
            _progress(f"building a store of {cfg.prefill_dirs * cfg.prefill_per_dir:,} paths "
                      f"in {cfg.prefill_dirs} directories")
            prefill_paths = build_prefilled(ws, prefilled_root, work, cfg)
        if sections & {"w1", "w2"}:
            _progress(f"W1/W2: {cfg.adds} adds per round")
            times = bench_adds(ws, cfg, rounds, work, dulwich, prefilled_root, sections)
            _report_adds(table, cfg, times, dulwich_note)
        if "w1b" in sections:
            for functions, label, goal in ((W1B_FUNCTIONS, f"W1b ({W1B_FUNCTIONS}-function "
                                            "modules)", 3.0),
                                           (0, "W1b (modules without code)", 1.5)):
                _progress(f"{label}: {cfg.spread_adds} adds over {cfg.spread_dirs} directories "
                          "per round")
                times = bench_spread_adds(ws, cfg, rounds, work, dulwich, functions)
                _report_adds(table, cfg, times, dulwich_note, label, cfg.spread_adds, goal)
        if "validate" in sections:
            _report_validation(table, bench_validation(ws, work, rounds))
        if args.file_ops:
            per_add = count_file_operations(ws, work, min(cfg.adds, 200))
            table.add("os calls per add (untimed run, ten directories)",
                      ", ".join(f"{name} {count:.1f}" for name, count in per_add.items()))
        if args.profile:
            profile_adds(ws, work, cfg.adds)
        if "w3" in sections:
            _run_w3(ws, cfg, rounds, work, table, prefilled_root, prefill_paths)
        if "w4" in sections:
            _run_w4(ws, cfg, rounds, work, table)
        if "big" in sections:
            ratios, size, baseline = bench_big_module(ws, work, cfg, rounds)
            for op, label in (("add_file", "Store.add_file"),
                              ("add_bytes", "Store.add (bytes, incl. the caller's copy)"),
                              ("find", "Store.find (incl. the returned bytes)")):
                ratio = _median(ratios[op])
                table.add(f"{size / 2**20:.0f} MB module {label}: peak RSS growth / size",
                          f"{ratio:.2f}x (baseline {baseline / 1024:.0f} MiB)", "< 3x",
                          ratio < 3)
        if "import" in sections:
            cli_rates, library_rates = bench_import(ws, work, cfg, rounds)
            table.add(f"bulk import CLI ({cfg.import_modules} modules, one commit)",
                      f"{_median(cli_rates):,.0f} modules/s", ">= 500",
                      _median(cli_rates) >= 500)
            table.add("bulk import Store.import_tree in-process",
                      f"{_median(library_rates):,.0f} modules/s")
        if "component" in sections:
            measured = bench_component_add(ws, work, rounds)
            if measured is None:
                table.add("component add (build/py-counter.wasm)", "not built: bash guests/build.sh")
            else:
                adds, compiles = measured
                table.add("component add_file of py-counter.wasm (18 MB), checked in full",
                          f"{_median(adds):.2f} s")
                table.add("  full wasmtime compile of it (baseline, same run)",
                          f"{_median(compiles):.2f} s")
                table.add("  add / full compile", f"{_median(adds) / _median(compiles):.2f}",
                          "< 0.25", _median(adds) / _median(compiles) < 0.25)
    return table


def _run_w3(ws, cfg, rounds, work, table, prefilled_root, prefill_paths):
    rates = bench_find(ws, prefilled_root, prefill_paths, cfg.lookups, rounds)
    table.add(f"W3 find by path, warm ({len(prefill_paths):,} paths)",
              f"{_median(rates):,.0f} lookups/s", ">= 50,000", _median(rates) >= 50_000)
    history_root = os.path.join(work, "history")
    _progress(f"building a history of {cfg.history_commits} commits")
    path = build_history(ws, history_root, cfg)
    cold, warm = bench_versions(ws, history_root, path, cfg.history_changes, rounds)
    label = f"{cfg.history_changes} changes in {cfg.history_commits:,} commits"
    table.add(f"W3 versions, warm ({label})", f"{_median(warm):.1f} ms", "<= 50 ms",
              _median(warm) <= 50)
    table.add(f"W3 versions, cold (new Store object, {label})", f"{_median(cold):.1f} ms",
              "<= 50 ms", _median(cold) <= 50)
    bare, _ = bench_versions(ws, history_root, path, cfg.history_changes, 1,   # 100x slower
                             history_cache=False)
    table.add("  the same, cold, without the history cache (trees diffed; one round)",
              f"{_median(bare):.1f} ms ({_median(bare) / _median(cold):.0f}x the cold figure)")
    shutil.rmtree(history_root)


def _run_w4(ws, cfg, rounds, work, table):
    measured = {}
    for label, size in (("small", cfg.gc_small_bytes),
                        ("10x", cfg.gc_small_bytes * cfg.gc_factor)):
        root = os.path.join(work, f"gc-{label}")
        _progress(f"W4: building a store of {cfg.gc_modules:,} modules of {size:,} bytes")
        build_gc_store(ws, root, work, cfg, size, label)
        total = directory_bytes(os.path.join(root, "objects"))
        results = {op: bench_maintenance(ws, root, op, rounds, label) for op in ("fsck", "gc")}
        for op in ("fsck", "gc"):
            _progress(f"W4 {label} {op}: {_median(results[op]['seconds']):.2f} s")
        measured[label] = (results, total)
        _report_maintenance(table, f"{cfg.gc_modules:,} modules of {size:,} B", results, total)
        shutil.rmtree(root)
    (small, small_bytes), (big, big_bytes) = measured["small"], measured["10x"]
    _report_memory_growth(table, small, big, small_bytes, big_bytes)


if __name__ == "__main__":
    sys.exit(main())
