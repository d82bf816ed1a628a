;; SPDX-License-Identifier: Apache-2.0
;; shout.wat: a WASI (preview 1) command: copies stdin to stdout in upper case (ASCII letters).
;; Try it:  python wasmstore.py add examples/shout.wat /tools/shout.wasm
;;          echo 'hello, wasm' | python wasmstore.py run /tools/shout.wasm    -> HELLO, WASM
;; It exits 1 if reading or writing fails.
;;
;; Memory: 0 the iovec (buffer pointer, length), 8 the byte count a call reports, 1024 a 4 KiB
;; buffer. fd_read(fd, iovs, iovs_len, *nread) and fd_write(fd, iovs, iovs_len, *nwritten)
;; return an errno (0 = success).
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)

  (func $upper (param $start i32) (param $end i32)
    (local $c i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $start) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $start)))
        (if (i32.lt_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 26))   ;; 'a'..'z'
          (then (i32.store8 (local.get $start) (i32.sub (local.get $c) (i32.const 32)))))
        (local.set $start (i32.add (local.get $start) (i32.const 1)))
        (br $next))))

  (func (export "_start")
    (local $n i32)
    (loop $chunk
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 4096))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then (call $proc_exit (i32.const 1))))
      (local.set $n (i32.load (i32.const 8)))
      (if (local.get $n)
        (then
          (call $upper (i32.const 1024) (i32.add (i32.const 1024) (local.get $n)))
          (i32.store (i32.const 4) (local.get $n))
          (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
            (then (call $proc_exit (i32.const 1))))
          (br $chunk)))))
)
