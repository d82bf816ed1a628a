;; SPDX-License-Identifier: Apache-2.0
;; wasi-sleep.wat: a WASI preview 1 module that blocks inside a host call (poll_oneoff), where
;; neither epoch interruption nor fuel can reach it.
;;   _start             sleeps for the number of milliseconds given as argv[1] (decimal digits;
;;                      default 3,600,000 = one hour), then prints "woke\n" to stdout
;;   sleep(ms: i64)     sleeps ms milliseconds the same way, then prints "woke\n"
;;   memory             (exported, as WASI requires)
;; A sleep is one poll_oneoff call with one subscription: a relative CLOCK_MONOTONIC timeout.
;; Traps (unreachable) if poll_oneoff fails or does not report that clock event.
;;
;; Preview-1 layouts (wasi_snapshot_preview1.witx; wasi-libc asserts the same offsets):
;;   subscription, 48 bytes, align 8:  userdata u64 +0, tag (eventtype u8, clock = 0) +8,
;;     u.clock +16: id (clockid u32, monotonic = 1) +16, timeout (ns u64) +24,
;;     precision u64 +32, flags (subclockflags u16, 0 = relative, 1 = abstime) +40
;;   event, 32 bytes, align 8:  userdata u64 +0, error (errno u16) +8, type (u8) +10,
;;     fd_readwrite +16 (nbytes u64 +16, flags u16 +24)
;;   poll_oneoff(in: *subscription, out: *event, nsubscriptions, *nevents) -> errno
;;   fd_write(fd, iovs: *(buf, len), iovs_len, *nwritten) -> errno
;; Memory: 0 subscription, 64 event, 96 nevents, 104 iovec, 112 nwritten, 128 "woke\n",
;;   1024 argv pointers and 2048 argv strings (argv must fit in 3 KiB, else it traps).
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 128) "woke\n")

  (func $check (param $ok i32)
    (if (i32.eqz (local.get $ok)) (then unreachable)))

  (func $sleep (export "sleep") (param $ms i64)
    (memory.fill (i32.const 0) (i32.const 0) (i32.const 100))
    (i64.store offset=0 (i32.const 0) (i64.const 0x51eeb))                  ;; userdata
    (i32.store8 offset=8 (i32.const 0) (i32.const 0))                      ;; eventtype clock
    (i32.store offset=16 (i32.const 0) (i32.const 1))                      ;; clock monotonic
    (i64.store offset=24 (i32.const 0) (i64.mul (local.get $ms) (i64.const 1000000)))  ;; ns
    (i64.store offset=32 (i32.const 0) (i64.const 0))                      ;; precision
    (i32.store16 offset=40 (i32.const 0) (i32.const 0))                    ;; relative
    (call $check (i32.eqz (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96))))
    (call $check (i32.eq (i32.load (i32.const 96)) (i32.const 1)))
    (call $check (i64.eq (i64.load offset=64 (i32.const 0)) (i64.const 0x51eeb)))
    (call $check (i32.eqz (i32.load16_u offset=72 (i32.const 0))))          ;; error
    (call $check (i32.eqz (i32.load8_u offset=74 (i32.const 0))))           ;; type clock
    (i32.store (i32.const 104) (i32.const 128))
    (i32.store (i32.const 108) (i32.const 5))
    (call $check (i32.eqz (call $fd_write (i32.const 1) (i32.const 104) (i32.const 1) (i32.const 112)))))

  ;; argv[1] as decimal milliseconds, or one hour when there is no argv[1].
  (func $requested-ms (result i64)
    (local $p i32) (local $ms i64) (local $digit i32)
    (call $check (i32.eqz (call $args_sizes_get (i32.const 96) (i32.const 112))))
    (if (i32.lt_u (i32.load (i32.const 96)) (i32.const 2)) (then (return (i64.const 3600000))))
    (call $check (i32.le_u (i32.load (i32.const 96)) (i32.const 256)))
    (call $check (i32.le_u (i32.load (i32.const 112)) (i32.const 3072)))
    (call $check (i32.eqz (call $args_get (i32.const 1024) (i32.const 2048))))
    (local.set $p (i32.load (i32.const 1028)))
    (block $end
      (loop $next
        (local.set $digit (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $end (i32.gt_u (local.get $digit) (i32.const 9)))
        (local.set $ms (i64.add (i64.mul (local.get $ms) (i64.const 10)) (i64.extend_i32_u (local.get $digit))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $ms))

  (func (export "_start")
    (call $sleep (call $requested-ms)))
)
