#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Build the real-toolchain test guests into build/ (gitignored; never committed):
#   build/py-counter.wasm  from guests/py-counter/app.py with componentize-py 0.25.1.
# Idempotent: does nothing when the output is newer than all of its sources.
# Run from anywhere: bash guests/build.sh   (.ci/run calls it after installing componentize-py).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

want_version=0.25.1
out=build/py-counter.wasm
sources=(guests/build.sh guests/py-counter/app.py guests/py-counter/wit wit/keyvalue-0.2.0-draft2)

if [[ -f $out ]] && [[ -z $(find "${sources[@]}" -newer "$out" -print -quit) ]]; then
    echo "build.sh: $out is up to date"
    exit 0
fi

if ! version=$(componentize-py --version 2>/dev/null); then
    echo "build.sh: componentize-py is not installed (pip install componentize-py==$want_version)" >&2
    exit 1
fi
if [[ $version != "componentize-py $want_version" ]]; then
    echo "build.sh: need componentize-py $want_version, found '$version'" >&2
    exit 1
fi

mkdir -p build
# Write to a temporary name and rename, so an interrupted build never leaves a
# truncated build/py-counter.wasm that looks up to date. Never --stub-wasi: it
# would stub out wasi:keyvalue too.
tmp=$(mktemp build/.py-counter.XXXXXX)
trap 'rm -f "$tmp"' EXIT
componentize-py --quiet \
    -d wit/keyvalue-0.2.0-draft2 -d guests/py-counter/wit -w wasmstore:py-counter/py-counter \
    componentize -p guests/py-counter app -o "$tmp"
chmod 644 "$tmp"                 # mktemp creates 0600
mv "$tmp" "$out"
trap - EXIT
echo "build.sh: built $out ($(stat -c %s "$out") bytes)"
