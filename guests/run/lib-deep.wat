;; SPDX-License-Identifier: Apache-2.0
;; lib-deep.wat: a library that itself imports a library, stored at /lib/deep.wasm; with
;; app-deep.wat it makes a two-level link: app-deep -> /lib/deep.wasm -> /lib/math.wasm.
;;   imports  "/lib/math.wasm" "square" (i32) -> i32
;;   cube(i32) -> i32         x * square(x): 3 gives 27
(module
  (import "/lib/math.wasm" "square" (func $square (param i32) (result i32)))
  (func (export "cube") (param $x i32) (result i32)
    (i32.mul (local.get $x) (call $square (local.get $x))))
)
