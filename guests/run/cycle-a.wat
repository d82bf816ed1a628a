;; SPDX-License-Identifier: Apache-2.0
;; cycle-a.wat: stored at /cycle/a.wasm; with cycle-b.wat (at /cycle/b.wasm) it forms an import
;; cycle, which the linker must report as an error naming the paths instead of recursing.
;;   imports  "/cycle/b.wasm" "f" (i32) -> i32
;;   g(x: i32) -> i32         f(x) + 1
(module
  (import "/cycle/b.wasm" "f" (func $f (param i32) (result i32)))
  (func (export "g") (param $x i32) (result i32)
    (i32.add (call $f (local.get $x)) (i32.const 1)))
)
