;; SPDX-License-Identifier: Apache-2.0
;; greet.wat: a component (the component model's WebAssembly text) with one function,
;;   greet(name: string) -> string      "Hello, <name>!"
;; Try it:  python wasmstore.py add examples/greet.wat /hello/greet.wasm
;;          python wasmstore.py call /hello/greet.wasm greet '"World"'       -> "Hello, World!"
;; Arguments are JSON, so a string is written in double quotes (inside single quotes for a shell).
;;
;; The core module inside works in its own linear memory: the host copies the name in through
;; `realloc` (a bump allocator), greet builds the answer after it and returns a pointer to the
;; answer's (pointer, length) pair, as the canonical ABI returns a string.
(component
  (core module $Greeter
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))                ;; below 1024: the constants, the pair
    (data (i32.const 16) "Hello, ")                          ;; 7 bytes at 16, "!" at 23
    (data (i32.const 23) "!")

    (func $alloc (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (global.get $heap))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then (if (i32.eq (memory.grow (i32.add (i32.shr_u (local.get $size) (i32.const 16))
                                                (i32.const 1)))
                          (i32.const -1))
                (then unreachable))))
      (local.get $p))

    (func (export "realloc")
      (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (call $alloc (local.get $size)))

    (func (export "greet") (param $name i32) (param $length i32) (result i32)
      (local $out i32)
      (local.set $out (call $alloc (i32.add (local.get $length) (i32.const 8))))
      (memory.copy (local.get $out) (i32.const 16) (i32.const 7))
      (memory.copy (i32.add (local.get $out) (i32.const 7)) (local.get $name) (local.get $length))
      (i32.store8 (i32.add (local.get $out) (i32.add (local.get $length) (i32.const 7)))
                  (i32.const 33))
      (i32.store (i32.const 0) (local.get $out))             ;; the (pointer, length) pair at 0
      (i32.store (i32.const 4) (i32.add (local.get $length) (i32.const 8)))
      (i32.const 0)))
  (core instance $greeter (instantiate $Greeter))
  (func (export "greet") (param "name" string) (result string)
    (canon lift (core func $greeter "greet") (memory (core memory $greeter "memory"))
      (realloc (core func $greeter "realloc")))))
