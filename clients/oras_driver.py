# SPDX-License-Identifier: Apache-2.0
"""Drive the PyPI `oras` client (oras-py) for the OCI section of ../test_all.py and for
../benchmarks/bench_oci.py.

oras-py is a library without a command line, so this script is its command line. It runs
under the interpreter of its own virtual environment (.venv-oras, made by .ci/run), never
the project's. One command per run; the answer is one JSON object on stdout; a failure is
{"error": "<ExceptionType>: <message>"} with exit status 1.

    oras_driver.py push TARGET FILE[:MEDIATYPE] [--config FILE:MEDIATYPE]
    oras_driver.py pull TARGET OUTDIR
    oras_driver.py manifest TARGET                  the manifest and its Content-Type
    oras_driver.py blob TARGET DIGEST               a blob, base64
    oras_driver.py tags TARGET
    oras_driver.py push-many REGISTRY PREFIX DIR    every *.wasm of DIR to PREFIX/<name>:latest,
                                                    timed (seconds, this loop only)
    oras_driver.py pull-many REGISTRY PREFIX OUTDIR NAME...   timed pulls

TARGET is HOST:PORT/REPOSITORY[:TAG]. Plain HTTP always (the tests' registries are on
loopback). Credentials: env ORAS_USER and ORAS_PASS select Basic auth (oras-py's "basic"
backend, read from those variables); without them the default token backend answers
Bearer challenges anonymously.
"""

import base64
import json
import os
import sys
import time

import oras.provider

WASM_CONFIG = "application/vnd.wasm.config.v0+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def client(target):
    backend = "basic" if os.environ.get("ORAS_USER") else "token"
    return oras.provider.Registry(hostname=target.split("/", 1)[0], insecure=True,
                                  auth_backend=backend)


def push(target, file, config=None):
    response = client(target).push(target=target, files=[file], manifest_config=config,
                                   disable_path_validation=True, quiet=True)
    return {"status": response.status_code}


def pull(target, outdir):
    return {"files": client(target).pull(target=target, outdir=outdir)}


def manifest(target):
    registry = client(target)
    container = registry.get_container(target)
    response = registry.do_request(f"{registry.prefix}://{container.manifest_url()}", "GET",
                                   headers={"Accept": MANIFEST})
    return {"status": response.status_code, "content_type": response.headers.get("Content-Type"),
            "digest": response.headers.get("Docker-Content-Digest"),
            "manifest": response.json() if response.status_code == 200 else None}


def blob(target, digest):
    response = client(target).get_blob(target, digest)
    return {"status": response.status_code, "b64": base64.b64encode(response.content).decode()}


def tags(target):
    return {"tags": client(target).get_tags(target)}


def push_many(registry, prefix, directory):
    names = sorted(name for name in os.listdir(directory) if name.endswith(".wasm"))
    config = os.path.join(directory, "config.json")
    with open(config, "w") as handle:
        handle.write("{}")
    session = oras.provider.Registry(hostname=registry, insecure=True)
    started = time.perf_counter()
    for name in names:
        session.push(target=f"{registry}/{prefix}/{name}:latest",
                     files=[f"{os.path.join(directory, name)}:application/wasm"],
                     manifest_config=f"{config}:{WASM_CONFIG}", disable_path_validation=True,
                     quiet=True)
    return {"seconds": time.perf_counter() - started, "count": len(names)}


def pull_many(registry, prefix, outdir, *names):
    session = oras.provider.Registry(hostname=registry, insecure=True)
    started = time.perf_counter()
    for name in names:
        session.pull(target=f"{registry}/{prefix}/{name}:latest", outdir=outdir)
    return {"seconds": time.perf_counter() - started, "count": len(names)}


COMMANDS = {"push": push, "pull": pull, "manifest": manifest, "blob": blob, "tags": tags,
            "push-many": push_many, "pull-many": pull_many}


def main(argv):
    args = list(argv)
    config = None
    if "--config" in args:
        index = args.index("--config")
        config = args[index + 1]
        del args[index:index + 2]
    try:
        command = COMMANDS[args[0]]
        answer = command(*args[1:], config) if args[0] == "push" else command(*args[1:])
    except Exception as exc:  # every failure goes back to the caller as JSON
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
