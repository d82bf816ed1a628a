;; SPDX-License-Identifier: Apache-2.0
;; watcher-draft2.wat: a guest of the wasi:keyvalue@0.2.0-draft2 `watch-service` world.
;; It exports `watcher`; on every event it appends one line to the value of key "log"
;; in bucket "watch-log":  "set <key>=<value>\n"  or  "delete <key>\n".
;; Attach it to other buckets only (a write to "watch-log" would notify itself).
;; Before logging it reads the key through the bucket handle it was given (so a bad
;; handle traps), then drops that handle, which the guest owns.
;;
;; Canonical-ABI layouts: result<own<bucket>, error> = disc +0, handle +4 (error +4..+16);
;; result<option<list<u8>>, error> = disc +0, option disc +4, ptr +8, len +12.
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
  ))
  (alias export $store "bucket" (type $bucket))

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
      (local.get $p))
    ;; post-return of both events (they return nothing, so it takes no parameters).
    (func (export "reset") (global.set $heap (i32.const 4096)))
  )
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))
  (alias core export $libc "reset" (core func $reset))

  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $get (canon lower (func $store "[method]bucket.get") (memory $mem) (realloc $realloc)))
  (core func $set (canon lower (func $store "[method]bucket.set") (memory $mem) (realloc $realloc)))
  (core func $drop-bucket (canon resource.drop $bucket))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "libc" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "kv" "open" (func $kv-open (param i32 i32 i32)))
    (import "kv" "get" (func $kv-get (param i32 i32 i32 i32)))
    (import "kv" "set" (func $kv-set (param i32 i32 i32 i32 i32 i32)))
    (import "kv" "drop-bucket" (func $drop-bucket (param i32)))
    (data (i32.const 16) "watch-log")
    (data (i32.const 32) "log")
    (data (i32.const 48) "set ")
    (data (i32.const 56) "delete ")
    (data (i32.const 64) "=")
    (data (i32.const 72) "\n")

    (func $alloc (param $size i32) (result i32)
      (call $realloc (i32.const 0) (i32.const 0) (i32.const 8) (local.get $size)))

    ;; Copy $len bytes from $src to $dst; returns the end of the copy.
    (func $put (param $dst i32) (param $src i32) (param $len i32) (result i32)
      (memory.copy (local.get $dst) (local.get $src) (local.get $len))
      (i32.add (local.get $dst) (local.get $len)))

    ;; Append  verb key [= value] "\n"  to watch-log/log. Failures are ignored: an
    ;; event handler has nowhere to report them.
    (func $log (param $vp i32) (param $vl i32) (param $kp i32) (param $kl i32) (param $with-value i32)
               (param $valp i32) (param $vall i32)
      (local $log i32) (local $t i32) (local $oldp i32) (local $oldl i32) (local $new i32) (local $end i32)
      (local.set $t (call $alloc (i32.const 16)))
      (call $kv-open (i32.const 16) (i32.const 9) (local.get $t))
      (if (i32.load8_u (local.get $t)) (then (return)))
      (local.set $log (i32.load offset=4 (local.get $t)))
      (call $kv-get (local.get $log) (i32.const 32) (i32.const 3) (local.get $t))
      (if (i32.and (i32.eqz (i32.load8_u (local.get $t))) (i32.load8_u offset=4 (local.get $t)))
        (then (local.set $oldp (i32.load offset=8 (local.get $t)))
              (local.set $oldl (i32.load offset=12 (local.get $t)))))
      (local.set $new (call $alloc (i32.add (i32.add (local.get $oldl) (local.get $vl))
                                            (i32.add (i32.add (local.get $kl) (local.get $vall)) (i32.const 2)))))
      (local.set $end (call $put (local.get $new) (local.get $oldp) (local.get $oldl)))
      (local.set $end (call $put (local.get $end) (local.get $vp) (local.get $vl)))
      (local.set $end (call $put (local.get $end) (local.get $kp) (local.get $kl)))
      (if (local.get $with-value)
        (then (local.set $end (call $put (local.get $end) (i32.const 64) (i32.const 1)))
              (local.set $end (call $put (local.get $end) (local.get $valp) (local.get $vall)))))
      (local.set $end (call $put (local.get $end) (i32.const 72) (i32.const 1)))
      (call $kv-set (local.get $log) (i32.const 32) (i32.const 3)
                    (local.get $new) (i32.sub (local.get $end) (local.get $new)) (local.get $t))
      (call $drop-bucket (local.get $log)))

    ;; Use the handed bucket once (a get of the key) and drop it.
    (func $release (param $b i32) (param $kp i32) (param $kl i32)
      (call $kv-get (local.get $b) (local.get $kp) (local.get $kl) (call $alloc (i32.const 16)))
      (call $drop-bucket (local.get $b)))

    (func (export "on-set") (param $b i32) (param $kp i32) (param $kl i32) (param $valp i32) (param $vall i32)
      (call $release (local.get $b) (local.get $kp) (local.get $kl))
      (call $log (i32.const 48) (i32.const 4) (local.get $kp) (local.get $kl) (i32.const 1) (local.get $valp) (local.get $vall)))

    (func (export "on-delete") (param $b i32) (param $kp i32) (param $kl i32)
      (call $release (local.get $b) (local.get $kp) (local.get $kl))
      (call $log (i32.const 56) (i32.const 7) (local.get $kp) (local.get $kl) (i32.const 0) (i32.const 0) (i32.const 0)))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "kv" (instance
      (export "open" (func $open)) (export "get" (func $get)) (export "set" (func $set))
      (export "drop-bucket" (func $drop-bucket))))))

  (func $on-set (param "bucket" (own $bucket)) (param "key" string) (param "value" (list u8))
    (canon lift (core func $main "on-set") (memory $mem) (realloc $realloc) (post-return $reset)))
  (func $on-delete (param "bucket" (own $bucket)) (param "key" string)
    (canon lift (core func $main "on-delete") (memory $mem) (realloc $realloc) (post-return $reset)))
  (instance $watcher
    (export "bucket" (type $bucket))
    (export "on-set" (func $on-set))
    (export "on-delete" (func $on-delete)))
  (export "wasi:keyvalue/watcher@0.2.0-draft2" (instance $watcher))
)
