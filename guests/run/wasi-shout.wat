;; SPDX-License-Identifier: Apache-2.0
;; wasi-shout.wat: a WASI preview 1 module whose exported function writes much output.
;;   shout(fd: i32, times: i32) -> i32
;;            writes the same 65,536-byte block `times` times to fd (1 = stdout, 2 = stderr)
;;            with fd_write, then returns `times`. The block starts with "shout-marker " and
;;            a line that looks like an access-log line, then zero bytes.
;;   memory   (exported, as WASI requires)
;; Example: shout(1, 16) writes 1 MiB to stdout and returns 16.
;; Memory: 0..7 the ciovec (buf 1024, len 65536), 8..11 *nbytes, 1024.. the block.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 1024) "shout-marker \0a127.0.0.1 - - \"GET /forged HTTP/1.1\" 200 -\0a")
  (func (export "shout") (param $fd i32) (param $times i32) (result i32)
    (local $i i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 65536))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $times)))
        (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $times)))
