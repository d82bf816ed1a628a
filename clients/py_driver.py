# SPDX-License-Identifier: Apache-2.0
"""Drive the published PyPI client `wasmstore==0.3.0` for the clients section of ../test_all.py.

Runs under the interpreter of the clients' virtual environment (never the project's), so it imports only the
client. Protocol, one JSON object per line on stdin, one answer per line on stdout:

    {"client": {"url": ..., "auth": ..., "branch": ...}, "call": "add", "args": ["a.wasm", {"b64": "..."}]}
    -> {"ok": <result>}  or  {"error": "<ExceptionType>: <message>"}

Arguments written as {"b64": ...} are decoded to bytes; bytes results are returned as {"b64": ...}.
The call "Client.auth" invokes the unbound method, because the client's `auth` attribute (the key) shadows
its own `auth()` method upstream.
"""

import base64
import json
import sys

import wasmstore


def decode_arg(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return value


def encode_result(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def run_call(request):
    client = wasmstore.Client(**request.get("client", {}))
    args = [decode_arg(arg) for arg in request.get("args", [])]
    name = request["call"]
    if name == "Client.auth":
        return wasmstore.Client.auth(client, *args)
    return getattr(client, name)(*args)


def main():
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": encode_result(run_call(request))}
        except Exception as exc:  # report every client failure to the test, which asserts on it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
