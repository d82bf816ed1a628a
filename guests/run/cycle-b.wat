;; SPDX-License-Identifier: Apache-2.0
;; cycle-b.wat: stored at /cycle/b.wasm; the other half of the cycle of cycle-a.wat.
;;   imports  "/cycle/a.wasm" "g" (i32) -> i32
;;   f(x: i32) -> i32         g(x) * 2
(module
  (import "/cycle/a.wasm" "g" (func $g (param i32) (result i32)))
  (func (export "f") (param $x i32) (result i32)
    (i32.mul (call $g (local.get $x)) (i32.const 2)))
)
