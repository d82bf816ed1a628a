;; SPDX-License-Identifier: Apache-2.0
;; app-linked.wat: imports two functions of the module stored at /lib/math.wasm (lib-math.wat);
;; the import module name is that store path, linked on the same branch and commit.
;;   imports  "/lib/math.wasm" "add" (i32, i32) -> i32, "/lib/math.wasm" "square" (i32) -> i32
;;   sum_of_squares(a: i32, b: i32) -> i32     add(square(a), square(b)): (3, 4) gives 25
(module
  (import "/lib/math.wasm" "add" (func $add (param i32 i32) (result i32)))
  (import "/lib/math.wasm" "square" (func $square (param i32) (result i32)))
  (func (export "sum_of_squares") (param $a i32) (param $b i32) (result i32)
    (call $add (call $square (local.get $a)) (call $square (local.get $b))))
)
