# SPDX-License-Identifier: Apache-2.0
"""bench_oci.py: the OCI figures (run it as ``python bench.py oci``).

Against a local CNCF distribution registry (Debian ``docker-registry``, started here on a free
loopback port with a temporary storage directory), each round measures, back to back:

- push of MODULES modules of MODULE_SIZE bytes, one ``wasmstore.push`` per module (the Wasm
  OCI artifact: module blob, config blob, manifest; each blob HEAD-checked first) vs the PyPI
  ``oras`` client (oras-py 0.2.43, in its own venv .venv-oras) pushing the same number of
  modules of the same size, with the Wasm config media type (goal: ratio >= 1.0);
- pull of those MODULES artifacts in one command (``wasmstore.pull_many``, what
  ``wasmstore.py pull REF PATH REF PATH ...`` runs: four downloads at once, every layer
  digest-checked and validated, then one durable commit per module) vs one ``oras pull`` per
  artifact into a directory, which is all oras-py offers (goal: ratio >= 1.0);
- for information: the same pulls as one ``wasmstore.pull`` call per module (each waits for
  its own fsynced commit before the next download starts, which oras, writing plain files,
  never does), and ``push --all`` (wasmstore.push_all: one repository per path, four
  connections) of MODULES other modules.

ratio = oras seconds / wasmstore seconds, so above 1 means wasmstore is faster; each figure is
the median of the per-round ratios (both sides run in the same round, one after the other).
Both sides keep one client session for the whole loop and time the loop only (oras runs in
its own process: clients/oras_driver.py times its own loop, without interpreter start-up).
"""

__version__ = "0.1.0"
__all__ = ["main"]

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORAS_PYTHON = os.path.join(os.environ.get("WASMSTORE_ORAS_VENV", os.path.join(REPO_DIR, ".venv-oras")),
                           "bin", "python")
ORAS_DRIVER = os.path.join(REPO_DIR, "clients", "oras_driver.py")
MODULES = 100
MODULE_SIZE = 100 * 1000
GOAL_RATIO = 1.0


class BenchError(Exception):
    """A peer of the benchmark is missing or failed; str() is one line."""


def _leb(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wasm_module(tag, size):
    """A valid core module of exactly `size` bytes: one custom section named tag, padded with
    random bytes (distinct, incompressible blobs)."""
    head = _leb(len(tag.encode())) + tag.encode()
    for payload_size in range(size - 10, 0, -1):
        if 9 + len(_leb(payload_size)) + payload_size == size:
            payload = head + os.urandom(payload_size - len(head))
            return b"\0asm\x01\0\0\0\x00" + _leb(len(payload)) + payload
    raise BenchError(f"cannot build a module of exactly {size} bytes")


# ------------------------------------------------------------------------------ registry

class Registry:
    """docker-registry on a free loopback port, storing in a temporary directory."""

    def __init__(self, directory):
        binary = shutil.which("docker-registry")
        if binary is None:
            raise BenchError("docker-registry is not installed (apt-get install docker-registry; "
                             ".ci/run installs it)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        config = os.path.join(directory, "registry.yml")
        with open(config, "w") as f:
            json.dump({"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
                       "storage": {"filesystem": {"rootdirectory": os.path.join(directory, "data")}},
                       "http": {"addr": self.address, "secret": "bench-only"}}, f)
        self.process = subprocess.Popen([binary, "serve", config], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise BenchError(f"docker-registry exited with status {self.process.returncode}")
                time.sleep(0.05)
        self.stop()
        raise BenchError("docker-registry did not answer within 30 s")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def oras(*args):
    if not os.path.exists(ORAS_PYTHON):
        raise BenchError(f"the oras client is missing: {ORAS_PYTHON} (python -m venv .venv-oras && "
                         ".venv-oras/bin/pip install oras==0.2.43; .ci/run does it)")
    done = subprocess.run([ORAS_PYTHON, ORAS_DRIVER, *args], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-300:]}
    if "error" in answer:
        raise BenchError(f"oras {args[0]} failed: {answer['error']}")
    return answer


# -------------------------------------------------------------------------------- rounds

def make_store(wasmstore, root, directory, tag, count, size):
    """A store holding count distinct modules at /m<i>.wasm (one import commit); the same
    modules as files in directory."""
    os.makedirs(directory)
    for index in range(count):
        with open(os.path.join(directory, f"m{index}.wasm"), "wb") as f:
            f.write(wasm_module(f"{tag}-{index}", size))
    store = wasmstore.Store(root)
    store.import_tree(directory)
    return store


def one_round(wasmstore, registry, work, number, count, size):
    """Seconds of each figure in one round: {"push": (ours, oras), "pull": ..., "mirror": ours}."""
    ours_dir, oras_dir = os.path.join(work, f"ours-{number}"), os.path.join(work, f"oras-{number}")
    store = make_store(wasmstore, os.path.join(work, f"store-{number}"), ours_dir, f"ws{number}", count, size)
    make_store(wasmstore, os.path.join(work, f"unused-{number}"), oras_dir, f"or{number}", count, size).close()
    names = [f"m{index}.wasm" for index in range(count)]
    prefix = f"oci://{registry.address}/ws{number}"

    with wasmstore.RegistryClient(registry.address) as client:
        started = time.perf_counter()
        for name in names:
            wasmstore.push(store, f"/{name}", f"{prefix}/{name}:latest", client=client)
        push_ours = time.perf_counter() - started
    push_oras = oras("push-many", registry.address, f"or{number}", oras_dir)["seconds"]

    target = wasmstore.Store(os.path.join(work, f"pulled-{number}"))
    with wasmstore.RegistryClient(registry.address) as client:
        started = time.perf_counter()
        wasmstore.pull_many(target, [(f"{prefix}/{name}:latest", f"/{name}") for name in names], client=client)
        pull_ours = time.perf_counter() - started
    one_by_one = wasmstore.Store(os.path.join(work, f"pulled-one-by-one-{number}"))
    with wasmstore.RegistryClient(registry.address) as client:
        started = time.perf_counter()
        for name in names:
            wasmstore.pull(one_by_one, f"{prefix}/{name}:latest", f"/{name}", client=client)
        pull_each = time.perf_counter() - started
    if not target.list() == one_by_one.list() == store.list():
        raise BenchError("a pulled store differs from the pushed one")
    pull_oras = oras("pull-many", registry.address, f"ws{number}", os.path.join(work, f"oras-out-{number}"),
                     *names)["seconds"]

    mirror_store = make_store(wasmstore, os.path.join(work, f"mirror-{number}"),
                              os.path.join(work, f"mirror-files-{number}"), f"mi{number}", count, size)
    started = time.perf_counter()
    report = wasmstore.push_all(mirror_store, f"oci://{registry.address}/mirror{number}")
    mirror_ours = time.perf_counter() - started
    if len(report.tags_pushed) != 3 * count:
        raise BenchError(f"push --all pushed {len(report.tags_pushed)} tags, expected {3 * count}")
    for each in (store, target, one_by_one, mirror_store):
        each.close()
    return {"push": (push_ours, push_oras), "pull": (pull_ours, pull_oras), "pull_each": (pull_each, pull_oras),
            "mirror": mirror_ours}


# --------------------------------------------------------------------------------- table

def print_table(rounds, count, size, out=sys.stdout):
    out.write(f"\nOCI benchmark: {count} modules of {size // 1000} KB to a local distribution registry, "
              f"medians of {len(rounds)} rounds\n\n")
    out.write("ratio = oras seconds / wasmstore seconds (median of the per-round ratios; > 1: wasmstore is faster)\n\n")
    out.write(f"{'figure':<36} {'wasmstore':>11} {'oras':>11} {'ratio':>7}  goal\n")
    out.write("-" * 78 + "\n")
    ratios = {}
    for figure, label, goal in (("push", f"push {count} modules (modules/s)", True),
                                ("pull", f"pull {count} modules (modules/s)", True),
                                ("pull_each", "  the same, one pull() per module", False)):
        ours = statistics.median(count / r[figure][0] for r in rounds)
        theirs = statistics.median(count / r[figure][1] for r in rounds)
        ratio = ratios[figure] = statistics.median(r[figure][1] / r[figure][0] for r in rounds)
        verdict = (f">= {GOAL_RATIO:.1f} " + ("met" if ratio >= GOAL_RATIO else "MISSED")) if goal \
            else "(information)"
        out.write(f"{label:<36} {ours:>11.1f} {theirs:>11.1f} {ratio:>7.2f}  {verdict}\n")
    mirror = statistics.median(count / r["mirror"] for r in rounds)
    out.write(f"{f'push --all of {count} modules (modules/s)':<36} {mirror:>11.1f} {'':>11} {'':>7}  (information)\n")
    out.write("\nper round (s, wasmstore/oras): " + " | ".join(
        f"push {r['push'][0]:.2f}/{r['push'][1]:.2f} pull {r['pull'][0]:.2f}/{r['pull'][1]:.2f} "
        f"one by one {r['pull_each'][0]:.2f} mirror {r['mirror']:.2f}" for r in rounds) + "\n")
    return ratios


# ---------------------------------------------------------------------------------- main

def _build_parser():
    parser = argparse.ArgumentParser(prog="bench.py oci",
                                     description="push and pull to a local OCI registry vs the oras client.")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    parser.add_argument("--modules", type=int, default=MODULES, help=f"modules per figure (default {MODULES})")
    parser.add_argument("--size", type=int, default=MODULE_SIZE, help=f"module size in bytes (default {MODULE_SIZE})")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    return parser


def main(argv=None):
    args = _build_parser().parse_args(argv)
    if args.rounds < 1 or args.modules < 1 or args.size < 64:
        sys.stderr.write("bench.py oci: error: --rounds >= 1, --modules >= 1 and --size >= 64 please\n")
        return 2
    if REPO_DIR not in sys.path:
        sys.path.insert(0, REPO_DIR)
    import wasmstore
    work = tempfile.mkdtemp(prefix="wasmstore-bench-oci-")
    registry = None
    try:
        registry = Registry(work)
        rounds = [one_round(wasmstore, registry, work, number, args.modules, args.size)
                  for number in range(args.rounds)]
    except (BenchError, wasmstore.StoreError) as exc:
        sys.stderr.write(f"bench.py oci: error: {exc}\n")
        return 1
    finally:
        if registry is not None:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rounds, args.modules, args.size)
    if args.json:
        print(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
