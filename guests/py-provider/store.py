# SPDX-License-Identifier: Apache-2.0
"""The exported `bucket` resource of py-provider (see app.py): a host bucket, passed through."""

from wit_world.exports import store as exported


class Bucket(exported.Bucket):
    def __init__(self, inner):
        self.inner = inner          # the host's bucket (dropped with this handle)

    def get(self, key):
        return self.inner.get(key)

    def set(self, key, value):
        self.inner.set(key, value)

    def delete(self, key):
        self.inner.delete(key)

    def exists(self, key):
        return self.inner.exists(key)

    def list_keys(self, cursor):
        return self.inner.list_keys(cursor)
