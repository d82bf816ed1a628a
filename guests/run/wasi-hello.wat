;; SPDX-License-Identifier: Apache-2.0
;; wasi-hello.wat: a WASI preview 1 command module (imports wasi_snapshot_preview1 only).
;;   _start   1. reads all of stdin (fd_read on fd 0 until it returns 0 bytes);
;;            2. writes to stdout "hello", then " <arg>" for each argument after argv[0], then
;;               "\n", then the stdin bytes unchanged;
;;            3. writes "wasi-hello: this line goes to stderr\n" to stderr;
;;            4. then, for each argument in order:
;;                 fail  exits at once with proc_exit(3);
;;                 env   prints the value of the environment variable GREETING and "\n", or
;;                       "GREETING unset\n";
;;                 file  opens "data.txt" in the first preopened directory (fd 3, path_open)
;;                       and prints its content, or "no file\n" when that fails (no preopen,
;;                       no such file);
;;               others are ignored. Returning from _start means exit status 0.
;;   memory   (exported, as WASI requires)
;; Example: stdin "abc", args [prog, "x", "env"], GREETING=hi -> stdout "hello x\nabchi\n".
;; Any unexpected WASI error traps (unreachable).
;;
;; Preview-1 layouts (wasi_snapshot_preview1.witx): an iovec/ciovec is (buf: i32, len: i32),
;; 8 bytes; fd_read/fd_write(fd, iovs, iovs_len, *nbytes) -> errno; args_sizes_get(*argc,
;; *buf_size) then args_get(argv: *i32[argc], buf) fills NUL-terminated strings (environ_* the
;; same, entries "KEY=VALUE"); path_open(dirfd, lookupflags, path, path_len, oflags: i32,
;; rights_base: i64, rights_inheriting: i64, fdflags: i32, *fd) -> errno.
;;
;; Memory: 0..1023 scratch and constants, from 4096 a bump heap that grows memory as needed.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))

  (memory (export "memory") 1)
  ;; scratch: 16 iovec, 24 nbytes / counts, 32 sizes, 40 opened fd
  (data (i32.const 64) "hello")
  (data (i32.const 72) " ")
  (data (i32.const 76) "\n")
  (data (i32.const 80) "wasi-hello: this line goes to stderr\n")  ;; 37 bytes
  (data (i32.const 128) "fail")
  (data (i32.const 136) "env")
  (data (i32.const 140) "file")
  (data (i32.const 144) "GREETING=")                               ;; 9 bytes
  (data (i32.const 160) "GREETING unset\n")                        ;; 15 bytes
  (data (i32.const 176) "data.txt")                                ;; 8 bytes
  (data (i32.const 192) "no file\n")                               ;; 8 bytes
  (global $heap (mut i32) (i32.const 4096))

  ;; Make sure [0, end) is inside memory.
  (func $reserve (param $end i32)
    (local $pages i32)
    (local.set $pages (i32.shr_u (i32.add (local.get $end) (i32.const 65535)) (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
              (then unreachable)))))

  (func $alloc (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7))
                               (i32.const -8)))
    (call $reserve (global.get $heap))
    (local.get $p))

  (func $check (param $errno i32)
    (if (local.get $errno) (then unreachable)))

  ;; Write all of [ptr, ptr+len) to fd.
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 16) (local.get $ptr))
        (i32.store (i32.const 20) (local.get $len))
        (call $check (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 24))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 24))))
        (br $more))))

  ;; Read fd to its end into fresh heap memory; returns the start, length in $read-len.
  (global $read-len (mut i32) (i32.const 0))
  (func $read-all (param $fd i32) (result i32)
    (local $start i32) (local $end i32)
    (local.set $start (global.get $heap))
    (local.set $end (local.get $start))
    (block $eof
      (loop $more
        (call $reserve (i32.add (local.get $end) (i32.const 65536)))
        (i32.store (i32.const 16) (local.get $end))
        (i32.store (i32.const 20) (i32.const 65536))
        (call $check (call $fd_read (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)))
        (br_if $eof (i32.eqz (i32.load (i32.const 24))))
        (local.set $end (i32.add (local.get $end) (i32.load (i32.const 24))))
        (br $more)))
    (global.set $read-len (i32.sub (local.get $end) (local.get $start)))
    (drop (call $alloc (global.get $read-len)))
    (local.get $start))

  (func $strlen (param $p i32) (result i32)
    (local $q i32)
    (local.set $q (local.get $p))
    (block $end
      (loop $next
        (br_if $end (i32.eqz (i32.load8_u (local.get $q))))
        (local.set $q (i32.add (local.get $q) (i32.const 1)))
        (br $next)))
    (i32.sub (local.get $q) (local.get $p)))

  ;; 1 if the len bytes at a equal those at b.
  (func $equal (param $a i32) (param $b i32) (param $len i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; 1 if the NUL-terminated string at s is the len-byte word at w.
  (func $is (param $s i32) (param $w i32) (param $len i32) (result i32)
    (if (result i32) (i32.eq (call $strlen (local.get $s)) (local.get $len))
      (then (call $equal (local.get $s) (local.get $w) (local.get $len)))
      (else (i32.const 0))))

  (func $print-greeting
    (local $count i32) (local $ptrs i32) (local $i i32) (local $entry i32)
    (call $check (call $environ_sizes_get (i32.const 24) (i32.const 32)))
    (local.set $count (i32.load (i32.const 24)))
    (local.set $ptrs (call $alloc (i32.shl (local.get $count) (i32.const 2))))
    (call $check (call $environ_get (local.get $ptrs) (call $alloc (i32.load (i32.const 32)))))
    (block $unset
      (loop $next
        (br_if $unset (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $entry (i32.load (i32.add (local.get $ptrs) (i32.shl (local.get $i) (i32.const 2)))))
        (if (i32.and (i32.ge_u (call $strlen (local.get $entry)) (i32.const 9))
                     (call $equal (local.get $entry) (i32.const 144) (i32.const 9)))
          (then
            (local.set $entry (i32.add (local.get $entry) (i32.const 9)))
            (call $write (i32.const 1) (local.get $entry) (call $strlen (local.get $entry)))
            (call $write (i32.const 1) (i32.const 76) (i32.const 1))
            (return)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $write (i32.const 1) (i32.const 160) (i32.const 15)))

  (func $print-file
    (local $data i32)
    ;; dirfd 3, lookupflags 0, "data.txt", oflags 0, rights_base fd_read (1 << 1), inheriting 0, fdflags 0
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 176) (i32.const 8) (i32.const 0)
                         (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 40))
      (then (call $write (i32.const 1) (i32.const 192) (i32.const 8)) (return)))
    (local.set $data (call $read-all (i32.load (i32.const 40))))
    (call $write (i32.const 1) (local.get $data) (global.get $read-len))
    (call $check (call $fd_close (i32.load (i32.const 40)))))

  (func (export "_start")
    (local $stdin i32) (local $stdin-len i32) (local $argc i32) (local $argv i32) (local $i i32)
    (local $arg i32)
    (local.set $stdin (call $read-all (i32.const 0)))
    (local.set $stdin-len (global.get $read-len))
    (call $check (call $args_sizes_get (i32.const 24) (i32.const 32)))
    (local.set $argc (i32.load (i32.const 24)))
    (local.set $argv (call $alloc (i32.shl (local.get $argc) (i32.const 2))))
    (call $check (call $args_get (local.get $argv) (call $alloc (i32.load (i32.const 32)))))

    (call $write (i32.const 1) (i32.const 64) (i32.const 5))
    (local.set $i (i32.const 1))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $i) (local.get $argc)))
        (local.set $arg (i32.load (i32.add (local.get $argv) (i32.shl (local.get $i) (i32.const 2)))))
        (call $write (i32.const 1) (i32.const 72) (i32.const 1))
        (call $write (i32.const 1) (local.get $arg) (call $strlen (local.get $arg)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $write (i32.const 1) (i32.const 76) (i32.const 1))
    (call $write (i32.const 1) (local.get $stdin) (local.get $stdin-len))
    (call $write (i32.const 2) (i32.const 80) (i32.const 37))

    (local.set $i (i32.const 1))
    (block $end
      (loop $next
        (br_if $end (i32.ge_u (local.get $i) (local.get $argc)))
        (local.set $arg (i32.load (i32.add (local.get $argv) (i32.shl (local.get $i) (i32.const 2)))))
        (if (call $is (local.get $arg) (i32.const 128) (i32.const 4)) (then (call $proc_exit (i32.const 3))))
        (if (call $is (local.get $arg) (i32.const 136) (i32.const 3)) (then (call $print-greeting)))
        (if (call $is (local.get $arg) (i32.const 140) (i32.const 4)) (then (call $print-file)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))
)
