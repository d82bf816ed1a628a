;; SPDX-License-Identifier: Apache-2.0
;; lib-math.wat: a library for the linking tests, stored at /lib/math.wasm (no imports).
;;   add(i32, i32) -> i32     wrapping sum
;;   square(i32) -> i32       x * x (wrapping)
;;   memory                   1 page (a non-function export, for importers that want it)
(module
  (memory (export "memory") 1)
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b)))
  (func (export "square") (param $x i32) (result i32)
    (i32.mul (local.get $x) (local.get $x)))
)
