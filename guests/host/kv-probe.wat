;; SPDX-License-Identifier: Apache-2.0
;; kv-probe.wat: the kvhost test and benchmark guest (wasi:keyvalue@0.2.0-draft2).
;;
;; Exports return the host's own wasi:keyvalue results unchanged (the `error` variant
;; included), so tests see exactly what the host gave the guest:
;;   get(bucket, key)            -> result<option<list<u8>>, error>
;;   set(bucket, key, value)     -> result<_, error>
;;   incr(bucket, key, delta)    -> result<s64, error>
;;   exists-loop(bucket, key, n) -> u32   n calls of bucket.exists; traps on an error
;;   set-get-loop(bucket, key, value, n) -> u32   n x (set, get); traps on an error
;;   incr-loop(bucket, key, n)   -> s64   n increments by 1; traps on an error; the last value
;;   spin()                      -> u32   never returns (timeout and fuel tests)
;;   grow(pages)                 -> s32   memory.grow's answer (max-memory tests)
;; Canonical-ABI layouts (byte offsets): result<own|option<list<u8>>|_|bool, error>: disc +0,
;; payload +4 (error: disc +4, other's string +8,+12); result<s64, error>: payload +8.
;; Scratch return areas live below 1024; the bump allocator hands out memory above it.
(component $C
  (import "wasi:keyvalue/store@0.2.0-draft2" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))
    (export "[method]bucket.get" (func (param "self" (borrow $bucket)) (param "key" string)
      (result (result (option (list u8)) (error $err)))))
    (export "[method]bucket.set" (func (param "self" (borrow $bucket)) (param "key" string) (param "value" (list u8))
      (result (result (error $err)))))
    (export "[method]bucket.exists" (func (param "self" (borrow $bucket)) (param "key" string)
      (result (result bool (error $err)))))
  ))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $error))
  (import "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $bucket1 (eq $bucket0)))
    (alias outer $C $error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "increment" (func (param "bucket" (borrow $bucket1)) (param "key" string) (param "delta" s64)
      (result (result s64 (error $err)))))
  ))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
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
      (local.get $p))
    (func (export "mark") (result i32) (global.get $heap))
    (func (export "rewind") (param $mark i32) (global.set $heap (local.get $mark)))
  )
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $get (canon lower (func $store "[method]bucket.get") (memory $mem) (realloc $realloc)))
  (core func $set (canon lower (func $store "[method]bucket.set") (memory $mem) (realloc $realloc)))
  (core func $exists (canon lower (func $store "[method]bucket.exists") (memory $mem) (realloc $realloc)))
  (core func $incr (canon lower (func $atomics "increment") (memory $mem) (realloc $realloc)))
  (core func $drop (canon resource.drop $bucket))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "libc" "mark" (func $mark (result i32)))
    (import "libc" "rewind" (func $rewind (param i32)))
    (import "kv" "open" (func $open (param i32 i32 i32)))
    (import "kv" "get" (func $get (param i32 i32 i32 i32)))
    (import "kv" "set" (func $set (param i32 i32 i32 i32 i32 i32)))
    (import "kv" "exists" (func $exists (param i32 i32 i32 i32)))
    (import "kv" "incr" (func $incr (param i32 i32 i32 i64 i32)))
    (import "kv" "drop" (func $drop (param i32)))

    ;; Open the bucket into the return area at 16: the handle, or -1 (the error stays at 16).
    (func $open-bucket (param $bp i32) (param $bl i32) (result i32)
      (call $open (local.get $bp) (local.get $bl) (i32.const 16))
      (if (result i32) (i32.load8_u (i32.const 16))
        (then (i32.const -1))
        (else (i32.load (i32.const 20)))))

    (func (export "get") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (i32.const 16))))
      (call $get (local.get $b) (local.get $kp) (local.get $kl) (i32.const 48))
      (call $drop (local.get $b))
      (i32.const 48))

    (func (export "set") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $vp i32) (param $vl i32)
      (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (i32.const 16))))
      (call $set (local.get $b) (local.get $kp) (local.get $kl) (local.get $vp) (local.get $vl) (i32.const 48))
      (call $drop (local.get $b))
      (i32.const 48))

    (func (export "incr") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $delta i64) (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1))
        (then
          ;; result<s64, error> keeps its payload at +8: move open's error there.
          (i32.store8 (i32.const 80) (i32.const 1))
          (i64.store (i32.const 88) (i64.load (i32.const 20)))
          (i32.store (i32.const 96) (i32.load (i32.const 28)))
          (return (i32.const 80))))
      (call $incr (local.get $b) (local.get $kp) (local.get $kl) (local.get $delta) (i32.const 80))
      (call $drop (local.get $b))
      (i32.const 80))

    (func (export "exists-loop") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $n i32) (result i32)
      (local $b i32) (local $hits i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then unreachable))
      (block $done
        (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (call $exists (local.get $b) (local.get $kp) (local.get $kl) (i32.const 48))
          (if (i32.load8_u (i32.const 48)) (then unreachable))
          (local.set $hits (i32.add (local.get $hits) (i32.load8_u (i32.const 52))))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
      (call $drop (local.get $b))
      (local.get $hits))

    (func (export "set-get-loop") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32)
      (param $vp i32) (param $vl i32) (param $n i32) (result i32)
      (local $b i32) (local $hits i32) (local $m i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then unreachable))
      (local.set $m (call $mark))
      (block $done
        (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (call $set (local.get $b) (local.get $kp) (local.get $kl) (local.get $vp) (local.get $vl) (i32.const 48))
          (if (i32.load8_u (i32.const 48)) (then unreachable))
          (call $get (local.get $b) (local.get $kp) (local.get $kl) (i32.const 48))
          (if (i32.load8_u (i32.const 48)) (then unreachable))
          (local.set $hits (i32.add (local.get $hits) (i32.load8_u (i32.const 52))))
          (call $rewind (local.get $m))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
      (call $drop (local.get $b))
      (local.get $hits))

    (func (export "incr-loop") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $n i32) (result i64)
      (local $b i32) (local $last i64)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then unreachable))
      (block $done
        (loop $next
          (br_if $done (i32.eqz (local.get $n)))
          (call $incr (local.get $b) (local.get $kp) (local.get $kl) (i64.const 1) (i32.const 80))
          (if (i32.load8_u (i32.const 80)) (then unreachable))
          (local.set $last (i64.load (i32.const 88)))
          (local.set $n (i32.sub (local.get $n) (i32.const 1)))
          (br $next)))
      (call $drop (local.get $b))
      (local.get $last))

    (func (export "spin") (result i32)
      (loop $forever (br $forever))
      (unreachable))

    (func (export "grow") (param $pages i32) (result i32)
      (memory.grow (local.get $pages)))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "kv" (instance
      (export "open" (func $open)) (export "get" (func $get)) (export "set" (func $set))
      (export "exists" (func $exists)) (export "incr" (func $incr)) (export "drop" (func $drop))))))

  (type $bytes (list u8))
  (func (export "get") (param "bucket" string) (param "key" string) (result (result (option $bytes) (error $error)))
    (canon lift (core func $main "get") (memory $mem) (realloc $realloc)))
  (func (export "set") (param "bucket" string) (param "key" string) (param "value" $bytes) (result (result (error $error)))
    (canon lift (core func $main "set") (memory $mem) (realloc $realloc)))
  (func (export "incr") (param "bucket" string) (param "key" string) (param "delta" s64) (result (result s64 (error $error)))
    (canon lift (core func $main "incr") (memory $mem) (realloc $realloc)))
  (func (export "exists-loop") (param "bucket" string) (param "key" string) (param "n" u32) (result u32)
    (canon lift (core func $main "exists-loop") (memory $mem) (realloc $realloc)))
  (func (export "set-get-loop") (param "bucket" string) (param "key" string) (param "value" $bytes) (param "n" u32)
    (result u32)
    (canon lift (core func $main "set-get-loop") (memory $mem) (realloc $realloc)))
  (func (export "incr-loop") (param "bucket" string) (param "key" string) (param "n" u32) (result s64)
    (canon lift (core func $main "incr-loop") (memory $mem) (realloc $realloc)))
  (func (export "spin") (result u32) (canon lift (core func $main "spin")))
  (func (export "grow") (param "pages" u32) (result s32) (canon lift (core func $main "grow")))
)
