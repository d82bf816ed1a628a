;; SPDX-License-Identifier: Apache-2.0
;; cli-run.wat: a wasi:cli/run@0.2.0 command that uses wasi:keyvalue@0.2.0-draft2.
;; Each run increments key "runs" in bucket "cli" and prints to stdout
;;     runs=<new value>
;;     arg:<argument>        (one line per argument after the program name)
;; It exits 1 if an argument is "fail" or if a keyvalue call fails (printing
;; "kv error: <case>"), else 0.
;;
;; Canonical-ABI layouts: result<own<bucket>, error> handle at +4; result<s64, error> value
;; at +8; get-arguments' list<string> = (ptr, len) at the return pointer, 8 bytes per string;
;; result<_, stream-error> = disc +0, stream-error disc +4, its own<error> handle +8.
(component $C
  (import "wasi:io/error@0.2.0" (instance $io-error
    (export "error" (type (sub resource)))))
  (alias export $io-error "error" (type $io-err))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-err (type $e0))
    (export "error" (type $e (eq $e0)))
    (export "output-stream" (type $os (sub resource)))
    (type $stream-error (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $se (eq $stream-error)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $se)))))))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (export "get-stdout" (func (result (own $os))))))
  (import "wasi:cli/environment@0.2.0" (instance $environment
    (export "get-arguments" (func (result (list string))))))
  (import "wasi:keyvalue/store@0.2.0-draft2" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $error))
  (import "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $bucket (eq $bucket0)))
    (alias outer $C $error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "increment" (func (param "bucket" (borrow $bucket)) (param "key" string) (param "delta" s64)
      (result (result s64 (error $err)))))))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then (if (i32.eq (memory.grow (i32.sub (i32.shr_u (i32.add (global.get $heap) (i32.const 65535)) (i32.const 16))
                                                (memory.size)))
                          (i32.const -1))
                (then unreachable))))
      (if (local.get $old)
        (then (memory.copy (local.get $p) (local.get $old)
                (select (local.get $old-size) (local.get $size) (i32.lt_u (local.get $old-size) (local.get $size))))))
      (local.get $p)))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $write (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $drop-stream (canon resource.drop $output-stream))
  (core func $drop-io-error (canon resource.drop $io-err))
  (core func $get-stdout (canon lower (func $stdout "get-stdout")))
  (core func $get-arguments (canon lower (func $environment "get-arguments") (memory $mem) (realloc $realloc)))
  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $increment (canon lower (func $atomics "increment") (memory $mem) (realloc $realloc)))
  (core func $drop-bucket (canon resource.drop $bucket))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "libc" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (import "host" "drop-io-error" (func $drop-io-error (param i32)))
    (import "host" "get-stdout" (func $get-stdout (result i32)))
    (import "host" "get-arguments" (func $get-arguments (param i32)))
    (import "host" "open" (func $kv-open (param i32 i32 i32)))
    (import "host" "increment" (func $kv-increment (param i32 i32 i32 i64 i32)))
    (import "host" "drop-bucket" (func $drop-bucket (param i32)))
    (data (i32.const 16) "cli")
    (data (i32.const 24) "runs")
    (data (i32.const 32) "runs=")
    (data (i32.const 40) "arg:")
    (data (i32.const 48) "fail")
    (data (i32.const 56) "kv error: ")
    (data (i32.const 72) "no-such-store")
    (data (i32.const 88) "access-denied")
    (data (i32.const 104) "other: ")
    (data (i32.const 112) "\n")
    (global $stdout (mut i32) (i32.const 0))

    (func $alloc (param $size i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (i32.const 8) (local.get $size)))

    (func $put (param $dst i32) (param $src i32) (param $len i32) (result i32)
      (memory.copy (local.get $dst) (local.get $src) (local.get $len))
      (i32.add (local.get $dst) (local.get $len)))

    ;; Print prefix + text + "\n" to stdout (write errors are dropped: nowhere to report them).
    (func $print (param $pp i32) (param $pl i32) (param $tp i32) (param $tl i32)
      (local $buf i32) (local $end i32) (local $t i32)
      (local.set $buf (call $alloc (i32.add (i32.add (local.get $pl) (local.get $tl)) (i32.const 1))))
      (local.set $end (call $put (local.get $buf) (local.get $pp) (local.get $pl)))
      (local.set $end (call $put (local.get $end) (local.get $tp) (local.get $tl)))
      (local.set $end (call $put (local.get $end) (i32.const 112) (i32.const 1)))
      (local.set $t (call $alloc (i32.const 12)))
      (call $write (global.get $stdout) (local.get $buf) (i32.sub (local.get $end) (local.get $buf)) (local.get $t))
      (if (i32.and (i32.load8_u (local.get $t)) (i32.eqz (i32.load8_u offset=4 (local.get $t))))
        (then (call $drop-io-error (i32.load offset=8 (local.get $t))))))

    ;; Print "kv error: <case>" for the wasi keyvalue error at $e; returns 1 (the exit code).
    (func $kv-error (param $e i32) (result i32)
      (local $case i32) (local $msg i32)
      (local.set $case (i32.load8_u (local.get $e)))
      (if (i32.eqz (local.get $case)) (then (call $print (i32.const 56) (i32.const 10) (i32.const 72) (i32.const 13))))
      (if (i32.eq (local.get $case) (i32.const 1)) (then (call $print (i32.const 56) (i32.const 10) (i32.const 88) (i32.const 13))))
      (if (i32.eq (local.get $case) (i32.const 2))
        (then (local.set $msg (call $alloc (i32.add (i32.load offset=8 (local.get $e)) (i32.const 7))))
              (drop (call $put (call $put (local.get $msg) (i32.const 104) (i32.const 7))
                               (i32.load offset=4 (local.get $e)) (i32.load offset=8 (local.get $e))))
              (call $print (i32.const 56) (i32.const 10)
                           (local.get $msg) (i32.add (i32.load offset=8 (local.get $e)) (i32.const 7)))))
      (i32.const 1))

    ;; Decimal digits of $n (>= 0) at a fresh buffer; returns its pointer, length in $digits-len.
    (global $digits-len (mut i32) (i32.const 0))
    (func $digits (param $n i64) (result i32)
      (local $buf i32) (local $p i32)
      (local.set $buf (call $alloc (i32.const 20)))
      (local.set $p (i32.add (local.get $buf) (i32.const 20)))
      (loop $next
        (local.set $p (i32.sub (local.get $p) (i32.const 1)))
        (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
        (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
        (br_if $next (i64.ne (local.get $n) (i64.const 0))))
      (global.set $digits-len (i32.sub (i32.add (local.get $buf) (i32.const 20)) (local.get $p)))
      (local.get $p))

    (func (export "run") (result i32)
      (local $t i32) (local $b i32) (local $n i64) (local $d i32) (local $args i32) (local $i i32)
      (local $s i32) (local $status i32)
      (global.set $stdout (call $get-stdout))
      (local.set $t (call $alloc (i32.const 16)))
      (block $done
        (call $kv-open (i32.const 16) (i32.const 3) (local.get $t))
        (if (i32.load8_u (local.get $t))
          (then (local.set $status (call $kv-error (i32.add (local.get $t) (i32.const 4)))) (br $done)))
        (local.set $b (i32.load offset=4 (local.get $t)))
        (call $kv-increment (local.get $b) (i32.const 24) (i32.const 4) (i64.const 1) (local.get $t))
        (call $drop-bucket (local.get $b))
        (if (i32.load8_u (local.get $t))
          (then (local.set $status (call $kv-error (i32.add (local.get $t) (i32.const 8)))) (br $done)))
        (local.set $d (call $digits (i64.load offset=8 (local.get $t))))
        (call $print (i32.const 32) (i32.const 5) (local.get $d) (global.get $digits-len))
        (call $get-arguments (local.get $t))
        (local.set $args (i32.load (local.get $t)))
        (local.set $i (i32.const 1))
        (block $end
          (loop $next
            (br_if $end (i32.ge_u (local.get $i) (i32.load offset=4 (local.get $t))))
            (local.set $s (i32.add (local.get $args) (i32.shl (local.get $i) (i32.const 3))))
            (call $print (i32.const 40) (i32.const 4) (i32.load (local.get $s)) (i32.load offset=4 (local.get $s)))
            (if (i32.eq (i32.load offset=4 (local.get $s)) (i32.const 4))
              (then (if (i32.eq (i32.load (i32.load (local.get $s))) (i32.load (i32.const 48)))
                      (then (local.set $status (i32.const 1))))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next))))
      (call $drop-stream (global.get $stdout))
      (local.get $status))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "write" (func $write)) (export "drop-stream" (func $drop-stream))
      (export "drop-io-error" (func $drop-io-error)) (export "get-stdout" (func $get-stdout))
      (export "get-arguments" (func $get-arguments)) (export "open" (func $open))
      (export "increment" (func $increment)) (export "drop-bucket" (func $drop-bucket))))))

  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance))
)
