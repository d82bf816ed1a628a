;; SPDX-License-Identifier: Apache-2.0
;; bad-import.wat: a guest whose keyvalue import does NOT match the WIT, so hosts must
;; refuse it before it runs. It imports wasi:keyvalue/atomics@0.2.0-draft2 but declares
;; `increment` with the older draft's u64 delta and result (draft2 has s64): the mistake
;; a guest makes when it is built against one draft and labelled with the other.
;; Its only export, `probe`, returns 7 without touching the store.
(component $C
  (import "wasi:keyvalue/store@0.2.0-draft2" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))
  ))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $error))
  (import "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $bucket (eq $bucket0)))
    (alias outer $C $error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "increment" (func (param "bucket" (borrow $bucket)) (param "key" string) (param "delta" u64)
      (result (result u64 (error $err)))))
  ))
  (core module $Main
    (func (export "probe") (result i32) (i32.const 7)))
  (core instance $main (instantiate $Main))
  (func (export "probe") (result u32) (canon lift (core func $main "probe")))
)
