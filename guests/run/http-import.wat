;; SPDX-License-Identifier: Apache-2.0
;; http-import.wat: a component that imports wasi:http like a default componentize-js build,
;; with the upstream wasi:http@0.2.0 types (a subset of the interfaces: only what it uses).
;;   imports  wasi:http/types@0.2.0: resources fields, outgoing-request, request-options,
;;              future-incoming-response; [constructor]fields, [constructor]outgoing-request;
;;              variant error-code (with its payload records);
;;            wasi:http/outgoing-handler@0.2.0: handle(request: outgoing-request,
;;              options: option<request-options>) -> result<future-incoming-response, error-code>
;;   hello: func() -> string     "hello from http-import"; touches no import
;;   fetch: func() -> u32        fields() -> outgoing-request(fields) (GET, no scheme or
;;                               authority) -> handle(request, none); 0 if handle returned ok (the
;;                               future is dropped unread), else 1 + the error-code case index
;; A host without wasi:http must refuse to instantiate it; with imports stubbed as traps,
;; hello runs and fetch traps at its first import call ([constructor]fields).
;;
;; Canonical ABI: error-code is a variant of 39 cases (u8 discriminant) whose largest payload
;; is option<field-size-payload> (24 bytes) and most aligned option<u64> (8), so it is 32 bytes,
;; payload at +8. result<own<future-incoming-response>, error-code> is 40 bytes, align 8:
;; discriminant +0, handle or error-code at +8 (so the error case index is the byte at +8).
;; handle's result goes through a return pointer and may hold strings, hence memory + realloc.
;; hello's string is returned as (ptr, len) at a return pointer.
(component $C
  (import "wasi:http/types@0.2.0" (instance $types
    (type $DNS-error-payload (record (field "rcode" (option string)) (field "info-code" (option u16))))
    (export "DNS-error-payload" (type $dep (eq $DNS-error-payload)))
    (type $TLS-alert-received-payload
      (record (field "alert-id" (option u8)) (field "alert-message" (option string))))
    (export "TLS-alert-received-payload" (type $tap (eq $TLS-alert-received-payload)))
    (type $field-size-payload (record (field "field-name" (option string)) (field "field-size" (option u32))))
    (export "field-size-payload" (type $fsp (eq $field-size-payload)))
    (type $error-code (variant
      (case "DNS-timeout")
      (case "DNS-error" $dep)
      (case "destination-not-found")
      (case "destination-unavailable")
      (case "destination-IP-prohibited")
      (case "destination-IP-unroutable")
      (case "connection-refused")
      (case "connection-terminated")
      (case "connection-timeout")
      (case "connection-read-timeout")
      (case "connection-write-timeout")
      (case "connection-limit-reached")
      (case "TLS-protocol-error")
      (case "TLS-certificate-error")
      (case "TLS-alert-received" $tap)
      (case "HTTP-request-denied")
      (case "HTTP-request-length-required")
      (case "HTTP-request-body-size" (option u64))
      (case "HTTP-request-method-invalid")
      (case "HTTP-request-URI-invalid")
      (case "HTTP-request-URI-too-long")
      (case "HTTP-request-header-section-size" (option u32))
      (case "HTTP-request-header-size" (option $fsp))
      (case "HTTP-request-trailer-section-size" (option u32))
      (case "HTTP-request-trailer-size" $fsp)
      (case "HTTP-response-incomplete")
      (case "HTTP-response-header-section-size" (option u32))
      (case "HTTP-response-header-size" $fsp)
      (case "HTTP-response-body-size" (option u64))
      (case "HTTP-response-trailer-section-size" (option u32))
      (case "HTTP-response-trailer-size" $fsp)
      (case "HTTP-response-transfer-coding" (option string))
      (case "HTTP-response-content-coding" (option string))
      (case "HTTP-response-timeout")
      (case "HTTP-upgrade-failed")
      (case "HTTP-protocol-error")
      (case "loop-detected")
      (case "configuration-error")
      (case "internal-error" (option string))))
    (export "error-code" (type $ec (eq $error-code)))
    (export "fields" (type $fields (sub resource)))
    (export "outgoing-request" (type $outgoing-request (sub resource)))
    (export "request-options" (type $request-options (sub resource)))
    (export "future-incoming-response" (type $future-incoming-response (sub resource)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[constructor]outgoing-request"
      (func (param "headers" (own $fields)) (result (own $outgoing-request))))))
  (alias export $types "outgoing-request" (type $outgoing-request))
  (alias export $types "request-options" (type $request-options))
  (alias export $types "future-incoming-response" (type $future-incoming-response))
  (alias export $types "error-code" (type $error-code))
  (import "wasi:http/outgoing-handler@0.2.0" (instance $outgoing-handler
    (alias outer $C $outgoing-request (type $or0))
    (export "outgoing-request" (type $or (eq $or0)))
    (alias outer $C $request-options (type $ro0))
    (export "request-options" (type $ro (eq $ro0)))
    (alias outer $C $future-incoming-response (type $fir0))
    (export "future-incoming-response" (type $fir (eq $fir0)))
    (alias outer $C $error-code (type $ec0))
    (export "error-code" (type $ec (eq $ec0)))
    (export "handle" (func (param "request" (own $or)) (param "options" (option (own $ro)))
      (result (result (own $fir) (error $ec)))))))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 1024))
    ;; Bump allocator for the strings of an error-code; never frees (each call is short-lived).
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then unreachable))
      (local.get $p)))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $new-fields (canon lower (func $types "[constructor]fields")))
  (core func $new-outgoing-request (canon lower (func $types "[constructor]outgoing-request")))
  (core func $handle (canon lower (func $outgoing-handler "handle") (memory $mem) (realloc $realloc)))
  (core func $drop-future (canon resource.drop $future-incoming-response))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "new-outgoing-request" (func $new-outgoing-request (param i32) (result i32)))
    ;; handle(request, option<request-options> as (discriminant, handle), return pointer)
    (import "host" "handle" (func $handle (param i32 i32 i32 i32)))
    (import "host" "drop-future" (func $drop-future (param i32)))
    (data (i32.const 16) "hello from http-import")                ;; 22 bytes
    (func (export "hello") (result i32)
      (i32.store (i32.const 8) (i32.const 16))
      (i32.store (i32.const 12) (i32.const 22))
      (i32.const 8))
    (func (export "fetch") (result i32)
      (local $request i32)
      (local.set $request (call $new-outgoing-request (call $new-fields)))
      (call $handle (local.get $request) (i32.const 0) (i32.const 0) (i32.const 64))
      (if (result i32) (i32.load8_u (i32.const 64))
        (then (i32.add (i32.const 1) (i32.load8_u (i32.const 72))))
        (else (call $drop-future (i32.load (i32.const 72))) (i32.const 0))))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "new-fields" (func $new-fields))
      (export "new-outgoing-request" (func $new-outgoing-request))
      (export "handle" (func $handle))
      (export "drop-future" (func $drop-future))))))

  (func (export "hello") (result string) (canon lift (core func $main "hello") (memory $mem)))
  (func (export "fetch") (result u32) (canon lift (core func $main "fetch")))
)
