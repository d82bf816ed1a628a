;; SPDX-License-Identifier: Apache-2.0
;; app-env.wat: imports "env" "abort" (i32, i32, i32, i32), as AssemblyScript builds do: a module
;; name that is neither a store path nor WASI, so no host can satisfy it and linking must fail
;; naming the import.
;;   run() -> i32             returns 1 without calling abort
(module
  (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
  (func (export "run") (result i32)
    (i32.const 1))
)
