;; SPDX-License-Identifier: Apache-2.0
;; wess-syscall.wat: the import and export shape of Wess's `syscall` example (a Rust cdylib built
;; for WASI): it imports a host function env.randomi32 and WASI functions, and exports
;;   random() -> i32                    one randomi32()
;;   random_numbers(n: i32) -> i32      a pointer to n randomi32() values (i32 each)
;;   random_numbers_len() -> i32        random_numbers(0), as the original does
;;   free_memory(ptr: i32)              does nothing here (the original frees a Vec)
;;   answer() -> i32                    42, without calling any import (for --stub-imports)
;;   memory
;; No host provides "env": --link env=PATH links it to a stored module exporting randomi32
;; (guests/run/randomi32.wat), --stub-imports makes it trap when called.
(module
  (import "env" "randomi32" (func $randomi32 (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))

  (func (export "random") (result i32)
    (call $randomi32))

  (func $random_numbers (export "random_numbers") (param $n i32) (result i32)
    (local $start i32) (local $i i32)
    (local.set $start (global.get $heap))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store (i32.add (local.get $start) (i32.shl (local.get $i) (i32.const 2)))
                   (call $randomi32))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (global.set $heap (i32.add (local.get $start) (i32.shl (local.get $n) (i32.const 2))))
    (local.get $start))

  (func (export "random_numbers_len") (result i32)
    (call $random_numbers (i32.const 0)))

  (func (export "free_memory") (param $ptr i32))

  (func (export "answer") (result i32)
    (i32.const 42))
)
