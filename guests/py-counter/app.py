# SPDX-License-Identifier: Apache-2.0
"""py-counter: the componentize-py test guest (world `wasmstore:py-counter/py-counter`).

Built in CI by guests/build.sh into build/py-counter.wasm (not committed) and exercised by
test_all.py (guests section) through kvhost: a counter that survives runs (SQLite backend; `run` prints
`hits=<n>`), paging through 2,500 keys with list-keys cursors, and namespace isolation
via put/peek.
Errors are returned as strings naming the wasi:keyvalue error case, like the WAT guests:
"no-such-store", "access-denied" or "other:<message>".
"""

import sys

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import atomics, batch, store

COUNTER_BUCKET = "counter"
COUNTER_KEY = "hits"
FILL_CHUNK = 500  # keys per set-many call: few host calls, modest guest memory


def error_name(error):
    """The test-facing name of a wasi:keyvalue store error."""
    if isinstance(error, store.Error_NoSuchStore):
        return "no-such-store"
    if isinstance(error, store.Error_AccessDenied):
        return "access-denied"
    if isinstance(error, store.Error_Other):
        return "other:" + error.value
    return "unexpected:" + repr(error)


def as_string_error(work):
    """Run work(); a keyvalue Err becomes Err(<error name>) for the caller."""
    try:
        return work()
    except Err as failure:
        raise Err(error_name(failure.value))


def bump_counter():
    with store.open(COUNTER_BUCKET) as bucket:
        return atomics.increment(bucket, COUNTER_KEY, 1)


class Run(exports.Run):
    """wasi:cli/run: one visit; exit status 1 (and the error on stderr) if the store fails."""

    def run(self):
        try:
            hits = bump_counter()
        except Err as failure:
            print("py-counter: " + error_name(failure.value), file=sys.stderr)
            raise Err(None)
        print("hits=%d" % hits)


class WitWorld(wit_world.WitWorld):
    def bump(self):
        return as_string_error(bump_counter)

    def fill(self, bucket_name, count):
        def work():
            with store.open(bucket_name) as bucket:
                for start in range(0, count, FILL_CHUNK):
                    stop = min(start + FILL_CHUNK, count)
                    batch.set_many(bucket, [("key-%05d" % i, b"%d" % i) for i in range(start, stop)])
            return count
        return as_string_error(work)

    def count_keys(self, bucket_name):
        def work():
            keys, pages, cursor = [], 0, None
            with store.open(bucket_name) as bucket:
                while True:
                    page = bucket.list_keys(cursor)
                    pages += 1
                    keys.extend(page.keys)
                    cursor = page.cursor
                    if cursor is None:
                        break
            return (len(keys), pages, keys == sorted(set(keys)))
        return as_string_error(work)

    def put(self, bucket_name, key, value):
        def work():
            with store.open(bucket_name) as bucket:
                bucket.set(key, value.encode())
        return as_string_error(work)

    def peek(self, bucket_name, key):
        def work():
            with store.open(bucket_name) as bucket:
                value = bucket.get(key)
            return None if value is None else value.decode()
        return as_string_error(work)
