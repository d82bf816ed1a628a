;; SPDX-License-Identifier: Apache-2.0
;; kv-handles.wat: a consumer that exercises handle lifetimes (wasi:keyvalue@0.2.0-draft2
;; store and atomics), for kvhost's composition tests. Results carry the wasi error itself:
;;   churn(bucket, key, n) -> result<u32, error>   n x (open, cas.new key, drop the cas, drop the bucket)
;;   hold(bucket, n)       -> result<u32, error>   n opens, none dropped until the call ends
;;   two-gets(bucket, first, second, reopen) -> result<option<list<u8>>, error>
;;                     open, get(first) (its answer ignored), then get(second) on the same
;;                     handle, or, with reopen, on a handle opened anew after dropping it
;; The first error ends a loop and is the answer. Layouts: result<own|u32|option<list<u8>>,
;; error> all have the disc at +0 and the payload (or the error) at +4, so an import's
;; answer is returned as it is.
(component $C
  (import "wasi:keyvalue/store@0.2.0-draft2" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))
    (export "[method]bucket.get" (func (param "self" (borrow $bucket)) (param "key" string)
      (result (result (option (list u8)) (error $err)))))
  ))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $error))
  (import "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $bucket (eq $bucket0)))
    (alias outer $C $error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "cas" (type $cas (sub resource)))
    (export "[static]cas.new" (func (param "bucket" (borrow $bucket)) (param "key" string)
      (result (result (own $cas) (error $err)))))
  ))
  (alias export $atomics "cas" (type $cas))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))))
      (local.get $p))
    (func (export "reset") (param i32) (global.set $heap (i32.const 4096)))
  )
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))
  (alias core export $libc "reset" (core func $reset))
  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $get (canon lower (func $store "[method]bucket.get") (memory $mem) (realloc $realloc)))
  (core func $drop-bucket (canon resource.drop $bucket))
  (core func $cas-new (canon lower (func $atomics "[static]cas.new") (memory $mem) (realloc $realloc)))
  (core func $drop-cas (canon resource.drop $cas))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "libc" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "kv" "open" (func $open (param i32 i32 i32)))
    (import "kv" "get" (func $get (param i32 i32 i32 i32)))
    (import "kv" "drop-bucket" (func $drop-bucket (param i32)))
    (import "kv" "cas-new" (func $cas-new (param i32 i32 i32 i32)))
    (import "kv" "drop-cas" (func $drop-cas (param i32)))
    (func $alloc (param $size i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (i32.const 8) (local.get $size)))
    (func $ok-count (param $n i32) (result i32)
      (local $r i32)
      (local.set $r (call $alloc (i32.const 16)))
      (i32.store8 (local.get $r) (i32.const 0))
      (i32.store offset=4 (local.get $r) (local.get $n))
      (local.get $r))

    (func (export "churn") (param $bp i32) (param $bl i32) (param $kp i32) (param $kl i32) (param $n i32) (result i32)
      (local $t i32) (local $b i32) (local $i i32)
      (local.set $t (call $alloc (i32.const 16)))
      (block $done
        (loop $next
          (br_if $done (i32.eq (local.get $i) (local.get $n)))
          (call $open (local.get $bp) (local.get $bl) (local.get $t))
          (if (i32.load8_u (local.get $t)) (then (return (local.get $t))))
          (local.set $b (i32.load offset=4 (local.get $t)))
          (call $cas-new (local.get $b) (local.get $kp) (local.get $kl) (local.get $t))
          (if (i32.load8_u (local.get $t))
            (then (call $drop-bucket (local.get $b)) (return (local.get $t))))
          (call $drop-cas (i32.load offset=4 (local.get $t)))
          (call $drop-bucket (local.get $b))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (call $ok-count (local.get $n)))

    (func (export "hold") (param $bp i32) (param $bl i32) (param $n i32) (result i32)
      (local $t i32) (local $i i32)
      (block $done
        (loop $next
          (br_if $done (i32.eq (local.get $i) (local.get $n)))
          (local.set $t (call $alloc (i32.const 16)))
          (call $open (local.get $bp) (local.get $bl) (local.get $t))
          (if (i32.load8_u (local.get $t)) (then (return (local.get $t))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next)))
      (call $ok-count (local.get $n)))

    (func (export "two-gets") (param $bp i32) (param $bl i32) (param $fp i32) (param $fl i32)
          (param $sp i32) (param $sl i32) (param $reopen i32) (result i32)
      (local $t i32) (local $r i32) (local $b i32)
      (local.set $t (call $alloc (i32.const 16)))
      (local.set $r (call $alloc (i32.const 16)))
      (call $open (local.get $bp) (local.get $bl) (local.get $t))
      (if (i32.load8_u (local.get $t)) (then (return (local.get $t))))
      (local.set $b (i32.load offset=4 (local.get $t)))
      (call $get (local.get $b) (local.get $fp) (local.get $fl) (local.get $r))
      (if (local.get $reopen)
        (then (call $drop-bucket (local.get $b))
              (call $open (local.get $bp) (local.get $bl) (local.get $t))
              (if (i32.load8_u (local.get $t)) (then (return (local.get $t))))
              (local.set $b (i32.load offset=4 (local.get $t)))))
      (call $get (local.get $b) (local.get $sp) (local.get $sl) (local.get $r))
      (call $drop-bucket (local.get $b))
      (local.get $r))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "kv" (instance
      (export "open" (func $open)) (export "get" (func $get)) (export "drop-bucket" (func $drop-bucket))
      (export "cas-new" (func $cas-new)) (export "drop-cas" (func $drop-cas))))))

  (func (export "churn") (param "bucket" string) (param "key" string) (param "n" u32) (result (result u32 (error $error)))
    (canon lift (core func $main "churn") (memory $mem) (realloc $realloc) (post-return $reset)))
  (func (export "hold") (param "bucket" string) (param "n" u32) (result (result u32 (error $error)))
    (canon lift (core func $main "hold") (memory $mem) (realloc $realloc) (post-return $reset)))
  (func (export "two-gets") (param "bucket" string) (param "first" string) (param "second" string) (param "reopen" bool)
    (result (result (option (list u8)) (error $error)))
    (canon lift (core func $main "two-gets") (memory $mem) (realloc $realloc) (post-return $reset)))
)
