;; SPDX-License-Identifier: Apache-2.0
;; app-deep.wat: the top of a two-level link (see lib-deep.wat).
;;   imports  "/lib/deep.wasm" "cube" (i32) -> i32
;;   sum_of_cubes(a: i32, b: i32) -> i32      cube(a) + cube(b): (2, 3) gives 35
(module
  (import "/lib/deep.wasm" "cube" (func $cube (param i32) (result i32)))
  (func (export "sum_of_cubes") (param $a i32) (param $b i32) (result i32)
    (i32.add (call $cube (local.get $a)) (call $cube (local.get $b))))
)
