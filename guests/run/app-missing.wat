;; SPDX-License-Identifier: Apache-2.0
;; app-missing.wat: imports "/lib/math.wasm" "nope", which lib-math does not export, so linking
;; must fail naming the missing export.
;;   run() -> i32             nope(1), if it ever ran
(module
  (import "/lib/math.wasm" "nope" (func $nope (param i32) (result i32)))
  (func (export "run") (result i32)
    (call $nope (i32.const 1)))
)
