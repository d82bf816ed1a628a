;; SPDX-License-Identifier: Apache-2.0
;; app-badtype.wat: imports "/lib/math.wasm" "add" with the WRONG type (i64, i64) -> i64
;; (lib-math's add is (i32, i32) -> i32), so linking must fail with a type-mismatch error
;; naming the import, before anything runs.
;;   run() -> i64             add(1, 2), if it ever ran
(module
  (import "/lib/math.wasm" "add" (func $add (param i64 i64) (result i64)))
  (func (export "run") (result i64)
    (call $add (i64.const 1) (i64.const 2)))
)
