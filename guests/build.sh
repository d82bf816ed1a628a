#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build the real-toolchain test guests into build/ (gitignored; never committed):
#   build/py-counter.wasm  from guests/py-counter/app.py with componentize-py 0.25.1;
#   build/py-provider.wasm from guests/py-provider/*.py with componentize-py 0.25.1 (a
#                          wasi:keyvalue provider: a layer over the host's wasi:keyvalue);
#   build/js-hello.wasm    from guests/js-hello/app.js with jco 1.35.0 (componentize-js 0.22.0),
#                          default options, so it imports wasi:http;
#   build/js-http.wasm     from guests/js-http/app.js with the same jco: a fetch handler (the
#                          wasi:http/proxy world of wit/wasi-http-0.2.10);
#   build/py-http.wasm     from guests/py-http/app.py with componentize-py 0.25.1: a wasi:http
#                          handler in Python (the same world).
# Idempotent: skips each output that is newer than all of its sources.
# Run from anywhere: bash guests/build.sh   (.ci/run calls it after installing componentize-py
# and running npm ci in guests/js-hello).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# up_to_date OUT SOURCE...: true when OUT exists and no source is newer.
up_to_date() {
    local out=$1; shift
    if [[ -f $out ]] && [[ -z $(find "$@" -newer "$out" -print -quit) ]]; then
        echo "build.sh: $out is up to date"
        return 0
    fi
    return 1
}

# Each build writes to a temporary name that publish renames into place, so an interrupted
# build never leaves a truncated output that looks up to date.
pending=""
trap 'rm -f "$pending"' EXIT

# start_output NAME: a fresh temporary file in build/ for output NAME, removed on failure.
start_output() {
    pending=$(mktemp "build/.$1.XXXXXX")
}

# publish OUT: move the finished temporary file into place as OUT.
publish() {
    chmod 644 "$pending"         # mktemp creates 0600
    mv "$pending" "$1"
    pending=""
    echo "build.sh: built $1 ($(stat -c %s "$1") bytes)"
}

# check_componentize_py: componentize-py must be installed, at the pinned version.
check_componentize_py() {
    local want_version=0.25.1 version
    if ! version=$(componentize-py --version 2>/dev/null); then
        echo "build.sh: componentize-py is not installed (pip install componentize-py==$want_version)" >&2
        return 1
    fi
    if [[ $version != "componentize-py $want_version" ]]; then
        echo "build.sh: need componentize-py $want_version, found '$version'" >&2
        return 1
    fi
}

build_py_counter() {
    local out=build/py-counter.wasm
    up_to_date "$out" guests/build.sh guests/py-counter/app.py guests/py-counter/wit \
        wit/keyvalue-0.2.0-draft2 && return 0
    check_componentize_py
    start_output py-counter
    # Never --stub-wasi: it would stub out wasi:keyvalue too.
    componentize-py --quiet \
        -d wit/keyvalue-0.2.0-draft2 -d guests/py-counter/wit -w wasmstore:py-counter/py-counter \
        componentize -p guests/py-counter app -o "$pending"
    publish "$out"
}

build_py_provider() {
    local out=build/py-provider.wasm dir=guests/py-provider
    up_to_date "$out" guests/build.sh "$dir"/*.py "$dir/wit" wit/keyvalue-0.2.0-draft2 && return 0
    check_componentize_py
    start_output py-provider
    # Never --stub-wasi (see above). The app's directory holds store.py and atomics.py, the
    # modules componentize-py takes the exported resources' classes from.
    componentize-py --quiet \
        -d wit/keyvalue-0.2.0-draft2 -d "$dir/wit" -w wasmstore:py-provider/py-provider \
        componentize -p "$dir" app -o "$pending"
    publish "$out"
}

# check_jco: guests/js-hello's jco must be installed, at the pinned version (js-http uses it too).
jco=guests/js-hello/node_modules/.bin/jco
check_jco() {
    local want_version=1.35.0 version
    if ! version=$("$jco" --version 2>/dev/null); then
        echo "build.sh: jco is not installed (cd guests/js-hello && npm ci)" >&2
        return 1
    fi
    if [[ $version != "$want_version" ]]; then
        echo "build.sh: need jco $want_version, found '$version' (cd guests/js-hello && npm ci)" >&2
        return 1
    fi
}

build_js_hello() {
    local out=build/js-hello.wasm dir=guests/js-hello
    up_to_date "$out" guests/build.sh "$dir/app.js" "$dir/wit" "$dir/package.json" \
        "$dir/package-lock.json" && return 0
    check_jco
    start_output js-hello
    # Default options (no --disable): the build imports wasi:http like most users' builds.
    "$jco" componentize "$dir/app.js" --wit "$dir/wit" --world-name js-hello -o "$pending" >/dev/null
    publish "$out"
}

build_js_http() {
    local out=build/js-http.wasm dir=guests/js-http
    up_to_date "$out" guests/build.sh "$dir/app.js" "$dir/wit" wit/wasi-http-0.2.10 \
        guests/js-hello/package-lock.json && return 0
    check_jco
    start_output js-http
    # The world is upstream's wasi:http/proxy; its wit/ holds the upstream files less the
    # wasi:cli worlds, whose wasi:sockets componentize-js cannot merge with its engine's.
    "$jco" componentize "$dir/app.js" --wit "$dir/wit" --world-name proxy -o "$pending" >/dev/null
    publish "$out"
}

build_py_http() {
    local out=build/py-http.wasm dir=guests/py-http
    up_to_date "$out" guests/build.sh "$dir/app.py" wit/wasi-http-0.2.10 && return 0
    check_componentize_py
    start_output py-http
    componentize-py --quiet -d wit/wasi-http-0.2.10 -w wasi:http/proxy componentize -p "$dir" app -o "$pending"
    publish "$out"
}

mkdir -p build
build_py_counter
build_py_provider
build_js_hello
build_js_http
build_py_http
