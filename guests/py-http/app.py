# SPDX-License-Identifier: Apache-2.0
"""py-http: a Python wasi:http handler (world wasi:http/proxy of wit/wasi-http-0.2.10).

Built by guests/build.sh with componentize-py 0.25.1 into build/py-http.wasm (not committed);
served by kvhost.Host.handle_http in test_all.py and by `wasmtime serve` beside it:
  GET  /          200 "hello from python\n" (content-type: text/plain)
  ANY  /echo...   200 "<METHOD> <path?query>\n" + "<name>: <value>\n" for each request header
                  whose name starts with x- (sorted) + "\n" + the request body
  anything else   404 "not found\n"
It uses the blocking stream calls (blocking-read, blocking-write-and-flush) only.
"""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import streams, types

WRITE_CHUNK = 4096      # what blocking-write-and-flush accepts at once


def method_name(method):
    """GET, POST, ... or the extension method's own name."""
    if isinstance(method, types.Method_Other):
        return method.value
    return type(method).__name__.split("_", 1)[1].upper()


def read_body(request):
    """The whole request body (the test bodies are small)."""
    incoming = request.consume()
    stream = incoming.stream()
    chunks = []
    while True:
        try:
            chunks.append(stream.blocking_read(65536))
        except Err as error:
            if isinstance(error.value, streams.StreamError_Closed):
                break
            raise
    stream.__exit__(None, None, None)
    return b"".join(chunks)


def answer(response_out, status, body):
    response = types.OutgoingResponse(types.Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    outgoing = response.body()
    types.ResponseOutparam.set(response_out, Ok(response))
    stream = outgoing.write()
    for start in range(0, len(body), WRITE_CHUNK):
        stream.blocking_write_and_flush(body[start:start + WRITE_CHUNK])
    stream.__exit__(None, None, None)
    types.OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out):
        path = request.path_with_query() or "/"
        if path == "/":
            answer(response_out, 200, b"hello from python\n")
        elif path.startswith("/echo"):
            headers = sorted((name, value) for name, value in request.headers().entries()
                             if name.startswith("x-"))
            head = f"{method_name(request.method())} {path}\n".encode()
            lines = b"".join(name.encode() + b": " + value + b"\n" for name, value in headers)
            answer(response_out, 200, head + lines + b"\n" + read_body(request))
        else:
            answer(response_out, 404, b"not found\n")
