# SPDX-License-Identifier: Apache-2.0
"""The exported `cas` resource of py-provider (see app.py): a host cas handle, passed through."""

from wit_world.exports import atomics as exported
from wit_world.imports import atomics as host_atomics


class Cas(exported.Cas):
    def __init__(self, inner):
        self.inner = inner          # the host's cas handle, until swap takes it

    @classmethod
    def new(cls, bucket, key):
        return cls(host_atomics.Cas.new(bucket.inner, key))

    def current(self):
        return self.inner.current()

    def take(self):
        """The host handle, for the host's swap (which consumes it)."""
        inner, self.inner = self.inner, None
        return inner
