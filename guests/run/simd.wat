;; SPDX-License-Identifier: Apache-2.0
;; simd.wat: a core module (no imports) whose exports use v128, a type no JSON caller can pass.
;;   add(i32, i32) -> i32        an ordinary function next to the v128 ones
;;   takes_v128(v128) -> i32     lane 0 of the vector as i32
;;   splat(i32) -> v128          the vector with x in all four i32 lanes
;; Beware: in wasmtime-py 50.0.1 asking a v128 ValType for its kind (str(), ==, or calling the
;; function, which checks its type) aborts the whole Python process ("`support for v128 ` is not
;; implemented", exit 134). A host must find these types without wasm_valtype_kind, or compile
;; with Config.wasm_simd = False so that this module is refused when it is compiled.
(module
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b)))
  (func (export "takes_v128") (param $v v128) (result i32)
    (i32x4.extract_lane 0 (local.get $v)))
  (func (export "splat") (param $x i32) (result v128)
    (i32x4.splat (local.get $x)))
)
