# SPDX-License-Identifier: Apache-2.0
"""py-provider: a wasi:keyvalue@0.2.0-draft2 provider written in Python (componentize-py 0.25.1).

Built in CI by guests/build.sh into build/py-provider.wasm (not committed). It exports store,
atomics and batch as a layer over the same interfaces imported from the host: the consumer's
bucket B is the host's bucket "py.B" ("" is "default", as on the host); keys, values, cursors,
counters, compare-and-swap and every error pass through. Run a consumer on it with
``python kvhost.py call --kv component:build/py-provider.wasm ...``.

componentize-py looks for the classes of exported resources in modules named after their
interfaces: ``store.Bucket`` (store.py) and ``atomics.Cas`` (atomics.py) wrap the host's handles.
"""

import wit_world
from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import atomics as exported_atomics
from wit_world.imports import atomics as host_atomics
from wit_world.imports import batch as host_batch
from wit_world.imports import store as host_store

import atomics
import store

PREFIX = "py."


def host_bucket_name(identifier):
    """The host bucket behind the consumer's bucket `identifier`."""
    return PREFIX + (identifier or "default")


class Store(exports.Store):
    def open(self, identifier):
        return store.Bucket(host_store.open(host_bucket_name(identifier)))


class Atomics(exports.Atomics):
    def increment(self, bucket, key, delta):
        return host_atomics.increment(bucket.inner, key, delta)

    def swap(self, cas, value):
        """Consumes `cas`; a cas-failed answer carries a fresh handle of this layer."""
        try:
            host_atomics.swap(cas.take(), value)
        except Err as failure:
            if isinstance(failure.value, host_atomics.CasError_CasFailed):
                raise Err(exported_atomics.CasError_CasFailed(atomics.Cas(failure.value.value)))
            raise Err(exported_atomics.CasError_StoreError(failure.value.value))


class Batch(exports.Batch):
    def get_many(self, bucket, keys):
        return host_batch.get_many(bucket.inner, keys)

    def set_many(self, bucket, key_values):
        host_batch.set_many(bucket.inner, key_values)

    def delete_many(self, bucket, keys):
        host_batch.delete_many(bucket.inner, keys)
