;; SPDX-License-Identifier: Apache-2.0
;; kv-probe-draft.wat: the kvhost test guest for wasi:keyvalue@0.2.0-draft (u64 counters,
;; numeric list-keys cursors). Exports return the host's results unchanged:
;;   set(bucket, key, value)   -> result<_, error>
;;   get(bucket, key)          -> result<option<list<u8>>, error>
;;   incr(bucket, key, delta)  -> result<u64, error>
;;   list-keys(bucket, cursor) -> result<key-response, error>    (cursor: option<u64>)
;; Layouts: result<_|option<list<u8>>|own, error>: payload +4; result<u64, error> and
;; result<key-response, error>: payload +8 (key-response = keys +8,+12, cursor disc +16, u64 +24).
(component $C
  (import "wasi:keyvalue/store@0.2.0-draft" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (type $key-response (record (field "keys" (list string)) (field "cursor" (option u64))))
    (export "key-response" (type $kr (eq $key-response)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))
    (export "[method]bucket.get" (func (param "self" (borrow $bucket)) (param "key" string)
      (result (result (option (list u8)) (error $err)))))
    (export "[method]bucket.set" (func (param "self" (borrow $bucket)) (param "key" string) (param "value" (list u8))
      (result (result (error $err)))))
    (export "[method]bucket.list-keys" (func (param "self" (borrow $bucket)) (param "cursor" (option u64))
      (result (result $kr (error $err)))))
  ))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $error))
  (alias export $store "key-response" (type $key-response))
  (import "wasi:keyvalue/atomics@0.2.0-draft" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $bucket1 (eq $bucket0)))
    (alias outer $C $error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "increment" (func (param "bucket" (borrow $bucket1)) (param "key" string) (param "delta" u64)
      (result (result u64 (error $err)))))
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
  )
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $get (canon lower (func $store "[method]bucket.get") (memory $mem) (realloc $realloc)))
  (core func $set (canon lower (func $store "[method]bucket.set") (memory $mem) (realloc $realloc)))
  (core func $list-keys (canon lower (func $store "[method]bucket.list-keys") (memory $mem) (realloc $realloc)))
  (core func $incr (canon lower (func $atomics "increment") (memory $mem) (realloc $realloc)))
  (core func $drop (canon resource.drop $bucket))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "kv" "open" (func $open (param i32 i32 i32)))
    (import "kv" "get" (func $get (param i32 i32 i32 i32)))
    (import "kv" "set" (func $set (param i32 i32 i32 i32 i32 i32)))
    (import "kv" "list-keys" (func $list-keys (param i32 i32 i64 i32)))
    (import "kv" "incr" (func $incr (param i32 i32 i32 i64 i32)))
    (import "kv" "drop" (func $drop (param i32)))

    ;; Open into the return area at 16: the handle, or -1 (the error stays at 16, payload +4).
    (func $open-bucket (param $bp i32) (param $bl i32) (result i32)
      (call $open (local.get $bp) (local.get $bl) (i32.const 16))
      (if (result i32) (i32.load8_u (i32.const 16))
        (then (i32.const -1))
        (else (i32.load (i32.const 20)))))

    ;; open's error, moved to a result whose payload sits at +8, at 80.
    (func $open-error-at-8 (result i32)
      (i32.store8 (i32.const 80) (i32.const 1))
      (i32.store (i32.const 88) (i32.load (i32.const 20)))
      (i32.store (i32.const 92) (i32.load (i32.const 24)))
      (i32.store (i32.const 96) (i32.load (i32.const 28)))
      (i32.const 80))

    (func (export "set") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $vp i32) (param $vl i32)
      (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (i32.const 16))))
      (call $set (local.get $b) (local.get $kp) (local.get $kl) (local.get $vp) (local.get $vl) (i32.const 48))
      (call $drop (local.get $b))
      (i32.const 48))

    (func (export "get") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (i32.const 16))))
      (call $get (local.get $b) (local.get $kp) (local.get $kl) (i32.const 48))
      (call $drop (local.get $b))
      (i32.const 48))

    (func (export "incr") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $delta i64) (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (call $open-error-at-8))))
      (call $incr (local.get $b) (local.get $kp) (local.get $kl) (local.get $delta) (i32.const 80))
      (call $drop (local.get $b))
      (i32.const 80))

    (func (export "list-keys") (param $bp i32) (param $bl i32) (param $cd i32) (param $cursor i64) (result i32)
      (local $b i32)
      (local.set $b (call $open-bucket (local.get $bp) (local.get $bl)))
      (if (i32.eq (local.get $b) (i32.const -1)) (then (return (call $open-error-at-8))))
      (call $list-keys (local.get $b) (local.get $cd) (local.get $cursor) (i32.const 80))
      (call $drop (local.get $b))
      (i32.const 80))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "kv" (instance
      (export "open" (func $open)) (export "get" (func $get)) (export "set" (func $set))
      (export "list-keys" (func $list-keys)) (export "incr" (func $incr)) (export "drop" (func $drop))))))

  (type $bytes (list u8))
  (func (export "set") (param "bucket" string) (param "key" string) (param "value" $bytes) (result (result (error $error)))
    (canon lift (core func $main "set") (memory $mem) (realloc $realloc)))
  (func (export "get") (param "bucket" string) (param "key" string) (result (result (option $bytes) (error $error)))
    (canon lift (core func $main "get") (memory $mem) (realloc $realloc)))
  (func (export "incr") (param "bucket" string) (param "key" string) (param "delta" u64) (result (result u64 (error $error)))
    (canon lift (core func $main "incr") (memory $mem) (realloc $realloc)))
  (func (export "list-keys") (param "bucket" string) (param "cursor" (option u64))
    (result (result $key-response (error $error)))
    (canon lift (core func $main "list-keys") (memory $mem) (realloc $realloc)))
)
