;; SPDX-License-Identifier: Apache-2.0
;; mistyped-provider.wat: exports wasi:keyvalue/atomics@0.2.0-draft2 with the older draft's
;; increment (delta and result u64 where draft2 says s64). kvhost must refuse it as a
;; provider, naming the function and both types, before any guest runs. It never runs.
(component
  (core module $M
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 64))
    (func (export "increment") (param i32 i32 i32 i64) (result i32) (i32.const 16)))
  (core instance $m (instantiate $M))
  (alias core export $m "memory" (core memory $mem))
  (alias core export $m "realloc" (core func $realloc))
  (type $bucket (resource (rep i32)))
  (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
  (func $increment (param "bucket" (borrow $bucket)) (param "key" string) (param "delta" u64)
    (result (result u64 (error $error)))
    (canon lift (core func $m "increment") (memory $mem) (realloc $realloc)))
  (instance $atomics (export "bucket" (type $bucket)) (export "error" (type $error))
    (export "increment" (func $increment)))
  (export "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics))
)
