;; SPDX-License-Identifier: Apache-2.0
;; hello.wat: the smallest wasi:http handler (the wasi:http/proxy world, @0.2.0 interfaces):
;; every request gets 200 with no headers and the body "hello from wasm\n", in six host calls:
;;   fields() -> outgoing-response(fields) -> body() -> response-outparam.set(ok) ->
;;   outgoing-body.write() -> output-stream.blocking-write-and-flush -> drop the stream ->
;;   outgoing-body.finish(none)
;; The request itself is never looked at (its handle is left to the end of the instance).
;;
;; Canonical ABI: error-code (a variant of 39 cases) flattens to 7 values, its payloads joined
;; position by position as (i32, i64, i32, i32, i32, i32) after the discriminant (option<u64>
;; puts an i64 second); result<own<outgoing-response>, error-code> is then 8 values, so
;; response-outparam.set takes 9 flat parameters. Results that do not flatten to one value come
;; back through a return pointer: result<own<T>> as (disc u8 +0, handle +4); result<_,
;; stream-error> 12 bytes; result<_, error-code> 40 bytes (error-code is 32 bytes, align 8).
(component $C
  (import "wasi:io/error@0.2.0" (instance $error (export "error" (type (sub resource)))))
  (alias export $error "error" (type $io-error))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-error (type $e0))
    (export "error" (type $e (eq $e0)))
    (type $se (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $se)))
    (export "output-stream" (type $os (sub resource)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $stream-error)))))))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:http/types@0.2.0" (instance $types
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (type $DNS-error-payload (record (field "rcode" (option string)) (field "info-code" (option u16))))
    (export "DNS-error-payload" (type $dep (eq $DNS-error-payload)))
    (type $TLS-alert-received-payload
      (record (field "alert-id" (option u8)) (field "alert-message" (option string))))
    (export "TLS-alert-received-payload" (type $tap (eq $TLS-alert-received-payload)))
    (type $field-size-payload (record (field "field-name" (option string)) (field "field-size" (option u32))))
    (export "field-size-payload" (type $fsp (eq $field-size-payload)))
    (type $error-code (variant
      (case "DNS-timeout") (case "DNS-error" $dep) (case "destination-not-found")
      (case "destination-unavailable") (case "destination-IP-prohibited") (case "destination-IP-unroutable")
      (case "connection-refused") (case "connection-terminated") (case "connection-timeout")
      (case "connection-read-timeout") (case "connection-write-timeout") (case "connection-limit-reached")
      (case "TLS-protocol-error") (case "TLS-certificate-error") (case "TLS-alert-received" $tap)
      (case "HTTP-request-denied") (case "HTTP-request-length-required")
      (case "HTTP-request-body-size" (option u64)) (case "HTTP-request-method-invalid")
      (case "HTTP-request-URI-invalid") (case "HTTP-request-URI-too-long")
      (case "HTTP-request-header-section-size" (option u32)) (case "HTTP-request-header-size" (option $fsp))
      (case "HTTP-request-trailer-section-size" (option u32)) (case "HTTP-request-trailer-size" $fsp)
      (case "HTTP-response-incomplete") (case "HTTP-response-header-section-size" (option u32))
      (case "HTTP-response-header-size" $fsp) (case "HTTP-response-body-size" (option u64))
      (case "HTTP-response-trailer-section-size" (option u32)) (case "HTTP-response-trailer-size" $fsp)
      (case "HTTP-response-transfer-coding" (option string)) (case "HTTP-response-content-coding" (option string))
      (case "HTTP-response-timeout") (case "HTTP-upgrade-failed") (case "HTTP-protocol-error")
      (case "loop-detected") (case "configuration-error") (case "internal-error" (option string))))
    (export "error-code" (type $ec (eq $error-code)))
    (export "fields" (type $fields (sub resource)))
    (export "incoming-request" (type $incoming-request (sub resource)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[constructor]outgoing-response" (func (param "headers" (own $fields)) (result (own $outgoing-response))))
    (export "[method]outgoing-response.body"
      (func (param "self" (borrow $outgoing-response)) (result (result (own $outgoing-body)))))
    (export "[static]response-outparam.set"
      (func (param "param" (own $response-outparam)) (param "response" (result (own $outgoing-response) (error $ec)))))
    (export "[method]outgoing-body.write" (func (param "self" (borrow $outgoing-body)) (result (result (own $os)))))
    (export "[static]outgoing-body.finish"
      (func (param "this" (own $outgoing-body)) (param "trailers" (option (own $fields))) (result (result (error $ec)))))))
  (alias export $types "incoming-request" (type $incoming-request))
  (alias export $types "response-outparam" (type $response-outparam))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    ;; Bump allocator (for the strings of an error-code); each instance serves one request.
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
  (core func $new-response (canon lower (func $types "[constructor]outgoing-response")))
  (core func $response-body (canon lower (func $types "[method]outgoing-response.body") (memory $mem)))
  (core func $outparam-set (canon lower (func $types "[static]response-outparam.set") (memory $mem)))
  (core func $body-write (canon lower (func $types "[method]outgoing-body.write") (memory $mem)))
  (core func $body-finish (canon lower (func $types "[static]outgoing-body.finish") (memory $mem) (realloc $realloc)))
  (core func $write-flush (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $drop-stream (canon resource.drop $output-stream))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "new-response" (func $new-response (param i32) (result i32)))
    (import "host" "response-body" (func $response-body (param i32 i32)))
    (import "host" "outparam-set" (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "body-write" (func $body-write (param i32 i32)))
    (import "host" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "host" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (data (i32.const 256) "hello from wasm\n")              ;; 16 bytes
    (func (export "handle") (param $request i32) (param $out i32)
      (local $response i32) (local $body i32) (local $stream i32)
      (local.set $response (call $new-response (call $new-fields)))
      (call $response-body (local.get $response) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $body (i32.load (i32.const 68)))
      (call $outparam-set (local.get $out) (i32.const 0) (local.get $response) (i32.const 0) (i64.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $body-write (local.get $body) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $stream (i32.load (i32.const 68)))
      (call $write-flush (local.get $stream) (i32.const 256) (i32.const 16) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (call $drop-stream (local.get $stream))
      (call $body-finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 128))
      (if (i32.load8_u (i32.const 128)) (then unreachable))))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "new-fields" (func $new-fields))
      (export "new-response" (func $new-response))
      (export "response-body" (func $response-body))
      (export "outparam-set" (func $outparam-set))
      (export "body-write" (func $body-write))
      (export "body-finish" (func $body-finish))
      (export "write-flush" (func $write-flush))
      (export "drop-stream" (func $drop-stream))))))

  (func $handle (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $handler))
)
