;; SPDX-License-Identifier: Apache-2.0
;; add.wat: a core module, the smallest thing to store and call.
;;   add(a: i32, b: i32) -> i32        a + b (wrapping at 32 bits)
;;   square(x: f64) -> f64             x * x
;; Try it:  python wasmstore.py add examples/add.wat /math/add.wasm
;;          python wasmstore.py call /math/add.wasm add 2 3                  -> 5
(module
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b)))
  (func (export "square") (param $x f64) (result f64)
    (f64.mul (local.get $x) (local.get $x))))
