# SPDX-License-Identifier: Apache-2.0
"""bench.py: the wasmstore benchmark entry point.

    python bench.py store [--rounds N] [--quick] ...   store figures: W1, W1b, W2-W4, 50 MB module, import,
                                                        component add
    python bench.py http  [--rounds N] ...              REST API figures
    python bench.py kv    [--rounds N] ...              wasi:keyvalue host figures
    python bench.py run   [--rounds N] [--quick] ...    running stored modules
    python bench.py oci   [--rounds N] ...              push/pull to a local registry vs oras
    python bench.py http-app [--rounds N] [--quick] ... stored HTTP apps: wasmstore serve vs
                                                        wasmtime serve (wrk)
    python bench.py AREA --help                         the area's own options

Each area lives in benchmarks/bench_<area>.py (a "-" in its name is "_" there), loaded by file path (benchmarks/ is not a
package), and exposes ``main(argv) -> int``. ``--rounds N`` (default 3) is common to every
area: each figure is the median of N rounds. Any other option is passed to the area as is.
"""

__version__ = "0.1.0"
__all__ = ["AREAS", "DEFAULT_ROUNDS", "load_area", "main"]

import argparse
import importlib.util
import os
import sys

AREAS = {
    "store": "wasmstore.Store and the CLI: adds/s vs dulwich (W1, W1b), find, versions, "
             "gc/fsck, 50 MB module, bulk import, component add",
    "http": "http_server.py: the REST API under load (GET, POST vs baselines; --workers 2 vs 1 "
            "under wrk)",
    "kv": "kvhost.py: wasi:keyvalue calls from guest modules",
    "run": "running stored modules: HTTP calls vs GET, Runner vs kvhost.Host, restart and cold compiles",
    "oci": "push and pull of Wasm OCI artifacts to a local registry vs the oras client",
    "http-app": "stored wasi:http apps: wasmstore serve vs wasmtime serve under wrk, and the JS "
                "handler's first request after a restart",
}
DEFAULT_ROUNDS = 3
REPO_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.join(REPO_DIR, "benchmarks")


class BenchError(Exception):
    """A benchmark area cannot be loaded; str() is a one-line message."""


def area_file(area):
    return os.path.join(BENCH_DIR, f"bench_{area.replace('-', '_')}.py")


def load_area(area):
    """Load benchmarks/bench_<area>.py by file path; returns the module."""
    filename = area_file(area)
    if not os.path.isfile(filename):
        raise BenchError(f"no benchmark for area {area!r} yet: "
                         f"{os.path.relpath(filename, REPO_DIR)} is missing")
    spec = importlib.util.spec_from_file_location(f"bench_{area.replace('-', '_')}", filename)
    module = importlib.util.module_from_spec(spec)
    # Registered before running so dataclasses/pickle inside the area can find the module.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise BenchError(f"{os.path.relpath(filename, REPO_DIR)} has no main(argv) function")
    return module


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Run a wasmstore benchmark area; every figure is the median of --rounds "
                    "rounds, and ratios are measured against a baseline in the same run.",
        epilog="areas:\n" + "\n".join(f"  {name:6} {text}" for name, text in AREAS.items())
               + "\n\nOptions after AREA go to the area: python bench.py store --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("area", metavar="AREA", choices=sorted(AREAS),
                        help="one of: " + ", ".join(AREAS))
    parser.add_argument("--rounds", type=_positive_int, default=None,
                        help=f"rounds per figure; the median is reported (default {DEFAULT_ROUNDS})")
    parser.add_argument("area_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    """Parse the common options, load the area and run it; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS
    area_argv = ["--rounds", str(rounds)] + args.area_args
    try:
        module = load_area(args.area)
    except BenchError as exc:
        sys.stderr.write(f"bench.py: error: {exc}\n")
        return 2
    try:
        return int(module.main(area_argv) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
