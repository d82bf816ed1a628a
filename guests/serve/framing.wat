;; SPDX-License-Identifier: Apache-2.0
;; framing.wat: a wasi:http handler (@0.2.0 interfaces) whose response is chosen by the first
;; letter of its path, to test how a server frames what a guest writes:
;;   /c  no content-length, 64 writes of 4096 bytes "x" (256 KiB): streamed, chunked
;;   /l  content-length: 262144, the same 64 writes: streamed with its length
;;   /o  content-length: 5, then a write of 12 bytes: more than it declared
;;   /s  content-length: 10, then 5 bytes and finish: less than it declared
;;   /t  no content-length, the 64 writes, then a trap: the response breaks off midway
;;   /n  a trap before any response
;;   /w  a loop that never ends (the server's timeout stops it)
;;   /a  body "<scheme> <authority>\n": scheme 0 HTTP, 1 HTTPS, 2 other, - none; authority as given
;;   /b  reads the whole request body first (blocking-reads of up to 4096 bytes), then answers
;;       "read <n>\n", n the number of body bytes it read
;;   else 200, header x-app: framing, body "framing\n"
;; Each write is a blocking-write-and-flush (at most 4096 bytes, as wasi:io allows).
;; result<list<u8>, stream-error> (blocking-read): disc +0, list ptr +4 and len +8, or the
;; stream-error's disc at +4 (1: closed, the end of the body).
;;
;; Canonical ABI (return areas at 64 and 128): option<string> disc +0, ptr +4, len +8;
;; option<scheme> disc +0, scheme's disc +4, other's string +8;
;; result<own<T>> disc +0, handle +4; result<_, header-error> and result<_, stream-error>
;; disc +0; result<_, error-code> 40 bytes. response-outparam.set takes 9 flat values
;; (error-code flattens to 7, see guests/http/hello.wat).
(component $C
  (import "wasi:io/error@0.2.0" (instance $error (export "error" (type (sub resource)))))
  (alias export $error "error" (type $io-error))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-error (type $e0))
    (export "error" (type $e (eq $e0)))
    (type $se (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $se)))
    (export "input-stream" (type $is (sub resource)))
    (export "output-stream" (type $os (sub resource)))
    (export "[method]input-stream.blocking-read"
      (func (param "self" (borrow $is)) (param "len" u64) (result (result (list u8) (error $stream-error)))))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $stream-error)))))))
  (alias export $streams "input-stream" (type $input-stream))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:http/types@0.2.0" (instance $types
    (alias outer $C $input-stream (type $is0))
    (export "input-stream" (type $is (eq $is0)))
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
    (type $header-error (variant (case "invalid-syntax") (case "forbidden") (case "immutable")))
    (export "header-error" (type $he (eq $header-error)))
    (export "fields" (type $fields (sub resource)))
    (export "incoming-request" (type $incoming-request (sub resource)))
    (export "incoming-body" (type $incoming-body (sub resource)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[method]fields.append"
      (func (param "self" (borrow $fields)) (param "name" string) (param "value" (list u8))
            (result (result (error $he)))))
    (export "[method]incoming-request.path-with-query"
      (func (param "self" (borrow $incoming-request)) (result (option string))))
    (export "[method]incoming-request.consume"
      (func (param "self" (borrow $incoming-request)) (result (result (own $incoming-body)))))
    (export "[method]incoming-body.stream" (func (param "self" (borrow $incoming-body)) (result (result (own $is)))))
    (export "[method]incoming-request.authority"
      (func (param "self" (borrow $incoming-request)) (result (option string))))
    (type $scheme (variant (case "HTTP") (case "HTTPS") (case "other" string)))
    (export "scheme" (type $sc (eq $scheme)))
    (export "[method]incoming-request.scheme"
      (func (param "self" (borrow $incoming-request)) (result (option $sc))))
    (export "[constructor]outgoing-response" (func (param "headers" (own $fields)) (result (own $outgoing-response))))
    (export "[method]outgoing-response.body"
      (func (param "self" (borrow $outgoing-response)) (result (result (own $outgoing-body)))))
    (export "[static]response-outparam.set"
      (func (param "param" (own $response-outparam)) (param "response" (result (own $outgoing-response) (error $ec)))))
    (export "[method]outgoing-body.write" (func (param "self" (borrow $outgoing-body)) (result (result (own $os)))))
    (export "[static]outgoing-body.finish"
      (func (param "this" (own $outgoing-body)) (param "trailers" (option (own $fields))) (result (result (error $ec)))))))
  (alias export $types "incoming-request" (type $incoming-request))
  (alias export $types "incoming-body" (type $incoming-body))
  (alias export $types "response-outparam" (type $response-outparam))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 16384))
    ;; Bump allocator (the path string, an error-code's strings); each instance serves one request.
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
        (then unreachable))
      (local.get $p))
    (func (export "reset") (global.set $heap (i32.const 16384))))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))
  (alias core export $libc "reset" (core func $reset))

  (core func $new-fields (canon lower (func $types "[constructor]fields")))
  (core func $append (canon lower (func $types "[method]fields.append") (memory $mem) (realloc $realloc)))
  (core func $path (canon lower (func $types "[method]incoming-request.path-with-query")
                                (memory $mem) (realloc $realloc)))
  (core func $authority (canon lower (func $types "[method]incoming-request.authority")
                                     (memory $mem) (realloc $realloc)))
  (core func $scheme (canon lower (func $types "[method]incoming-request.scheme")
                                  (memory $mem) (realloc $realloc)))
  (core func $new-response (canon lower (func $types "[constructor]outgoing-response")))
  (core func $response-body (canon lower (func $types "[method]outgoing-response.body") (memory $mem)))
  (core func $outparam-set (canon lower (func $types "[static]response-outparam.set") (memory $mem)))
  (core func $body-write (canon lower (func $types "[method]outgoing-body.write") (memory $mem)))
  (core func $body-finish (canon lower (func $types "[static]outgoing-body.finish") (memory $mem) (realloc $realloc)))
  (core func $write-flush (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $drop-stream (canon resource.drop $output-stream))
  (core func $consume (canon lower (func $types "[method]incoming-request.consume") (memory $mem)))
  (core func $body-stream (canon lower (func $types "[method]incoming-body.stream") (memory $mem)))
  (core func $read (canon lower (func $streams "[method]input-stream.blocking-read") (memory $mem) (realloc $realloc)))
  (core func $drop-input (canon resource.drop $input-stream))
  (core func $drop-incoming-body (canon resource.drop $incoming-body))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "append" (func $append (param i32 i32 i32 i32 i32 i32)))
    (import "host" "path" (func $path (param i32 i32)))
    (import "host" "authority" (func $authority (param i32 i32)))
    (import "host" "scheme" (func $scheme (param i32 i32)))
    (import "host" "new-response" (func $new-response (param i32) (result i32)))
    (import "host" "response-body" (func $response-body (param i32 i32)))
    (import "host" "outparam-set" (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "body-write" (func $body-write (param i32 i32)))
    (import "host" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "host" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (import "host" "consume" (func $consume (param i32 i32)))
    (import "host" "body-stream" (func $body-stream (param i32 i32)))
    (import "host" "read" (func $read (param i32 i64 i32)))
    (import "host" "drop-input" (func $drop-input (param i32)))
    (import "host" "drop-incoming-body" (func $drop-incoming-body (param i32)))
    (import "host" "reset" (func $reset))
    (data (i32.const 256) "content-length")                  ;; 14 bytes
    (data (i32.const 272) "262144")                          ;; 6 bytes
    (data (i32.const 280) "5")
    (data (i32.const 284) "10")
    (data (i32.const 288) "hello world\n")                   ;; 12 bytes
    (data (i32.const 304) "x-app")                           ;; 5 bytes
    (data (i32.const 312) "framing\n")                       ;; 8 bytes; "framing" is the header value
    (data (i32.const 320) "read ")                           ;; 5 bytes
    ;; 4096 bytes of "x" at 4096 are written by $fill.

    (func $fill
      (local $i i32)
      (loop $next
        (i32.store8 (i32.add (i32.const 4096) (local.get $i)) (i32.const 120))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $next (i32.lt_u (local.get $i) (i32.const 4096)))))

    ;; header name/value in memory, appended to $fields (a failure traps)
    (func $header (param $fields i32) (param $name i32) (param $name-len i32) (param $value i32) (param $value-len i32)
      (call $append (local.get $fields) (local.get $name) (local.get $name-len) (local.get $value)
                    (local.get $value-len) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable)))

    ;; the response with these headers set; returns the output stream (its body at 200)
    (func $respond (param $out i32) (param $fields i32) (result i32)
      (local $response i32) (local $body i32)
      (local.set $response (call $new-response (local.get $fields)))
      (call $response-body (local.get $response) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $body (i32.load (i32.const 68)))
      (i32.store (i32.const 200) (local.get $body))
      (call $outparam-set (local.get $out) (i32.const 0) (local.get $response) (i32.const 0) (i64.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $body-write (local.get $body) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (i32.load (i32.const 68)))

    (func $write (param $stream i32) (param $ptr i32) (param $len i32)
      (call $write-flush (local.get $stream) (local.get $ptr) (local.get $len) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable)))

    (func $write-256k (param $stream i32)
      (local $n i32)
      (call $fill)
      (loop $next
        (call $write (local.get $stream) (i32.const 4096) (i32.const 4096))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br_if $next (i32.lt_u (local.get $n) (i32.const 64)))))

    (func $finish (param $stream i32)
      (call $drop-stream (local.get $stream))
      (call $body-finish (i32.load (i32.const 200)) (i32.const 0) (i32.const 0) (i32.const 128))
      (if (i32.load8_u (i32.const 128)) (then unreachable)))

    ;; read the request body to its end; the number of bytes read
    (func $read-all (param $request i32) (result i32)
      (local $incoming i32) (local $in i32) (local $total i32)
      (call $consume (local.get $request) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $incoming (i32.load (i32.const 68)))
      (call $body-stream (local.get $incoming) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $in (i32.load (i32.const 68)))
      (block $end
        (loop $each
          (call $reset)
          (call $read (local.get $in) (i64.const 4096) (i32.const 64))
          (if (i32.load8_u (i32.const 64)) (then
            (br_if $end (i32.eq (i32.load8_u (i32.const 68)) (i32.const 1)))      ;; closed
            unreachable))
          (local.set $total (i32.add (local.get $total) (i32.load (i32.const 72))))
          (br $each)))
      (call $drop-input (local.get $in))
      (call $drop-incoming-body (local.get $incoming))
      (local.get $total))

    ;; "read <n>\n" at 1024; its length
    (func $read-line (param $n i32) (result i32)
      (local $digits i32) (local $i i32) (local $v i32)
      (memory.copy (i32.const 1024) (i32.const 320) (i32.const 5))
      (local.set $v (local.get $n))
      (loop $count                                      ;; how many digits (at least one)
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
        (br_if $count (local.get $v)))
      (local.set $v (local.get $n))
      (local.set $i (local.get $digits))
      (loop $each                                       ;; written from the last digit back
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (i32.store8 (i32.add (i32.const 1029) (local.get $i))
                    (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
        (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
        (br_if $each (local.get $i)))
      (i32.store8 (i32.add (i32.const 1029) (local.get $digits)) (i32.const 10))
      (i32.add (i32.const 6) (local.get $digits)))

    (func (export "handle") (param $request i32) (param $out i32)
      (local $letter i32) (local $fields i32) (local $stream i32) (local $length i32)
      (call $path (local.get $request) (i32.const 64))
      (if (i32.and (i32.load8_u (i32.const 64)) (i32.gt_u (i32.load (i32.const 72)) (i32.const 1)))
        (then (local.set $letter (i32.load8_u (i32.add (i32.load (i32.const 68)) (i32.const 1))))))
      (local.set $fields (call $new-fields))
      (if (i32.eq (local.get $letter) (i32.const 110)) (then unreachable))             ;; n
      (if (i32.eq (local.get $letter) (i32.const 119)) (then (loop $forever (br $forever))))   ;; w
      (if (i32.eq (local.get $letter) (i32.const 97)) (then                           ;; a
        (call $scheme (local.get $request) (i32.const 64))
        (i32.store8 (i32.const 1024) (i32.const 45))                                ;; "-"
        (if (i32.load8_u (i32.const 64))
          (then (i32.store8 (i32.const 1024) (i32.add (i32.const 48) (i32.load8_u (i32.const 68))))))
        (i32.store8 (i32.const 1025) (i32.const 32))
        (call $authority (local.get $request) (i32.const 64))
        (local.set $length (i32.const 0))
        (if (i32.load8_u (i32.const 64)) (then
          (local.set $length (i32.load (i32.const 72)))
          (memory.copy (i32.const 1026) (i32.load (i32.const 68)) (local.get $length))))
        (i32.store8 (i32.add (i32.const 1026) (local.get $length)) (i32.const 10))
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write (local.get $stream) (i32.const 1024) (i32.add (local.get $length) (i32.const 3)))
        (call $finish (local.get $stream))
        (return)))
      (if (i32.eq (local.get $letter) (i32.const 98)) (then                           ;; b
        (local.set $length (call $read-line (call $read-all (local.get $request))))
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write (local.get $stream) (i32.const 1024) (local.get $length))
        (call $finish (local.get $stream))
        (return)))
      (if (i32.eq (local.get $letter) (i32.const 99)) (then                           ;; c
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write-256k (local.get $stream))
        (call $finish (local.get $stream))
        (return)))
      (if (i32.eq (local.get $letter) (i32.const 108)) (then                          ;; l
        (call $header (local.get $fields) (i32.const 256) (i32.const 14) (i32.const 272) (i32.const 6))
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write-256k (local.get $stream))
        (call $finish (local.get $stream))
        (return)))
      (if (i32.eq (local.get $letter) (i32.const 116)) (then                          ;; t
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write-256k (local.get $stream))
        unreachable))
      (if (i32.eq (local.get $letter) (i32.const 111)) (then                          ;; o
        (call $header (local.get $fields) (i32.const 256) (i32.const 14) (i32.const 280) (i32.const 1))
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write (local.get $stream) (i32.const 288) (i32.const 12))
        (call $finish (local.get $stream))
        (return)))
      (if (i32.eq (local.get $letter) (i32.const 115)) (then                          ;; s
        (call $header (local.get $fields) (i32.const 256) (i32.const 14) (i32.const 284) (i32.const 2))
        (local.set $stream (call $respond (local.get $out) (local.get $fields)))
        (call $write (local.get $stream) (i32.const 288) (i32.const 5))
        (call $finish (local.get $stream))
        (return)))
      (call $header (local.get $fields) (i32.const 304) (i32.const 5) (i32.const 312) (i32.const 7))
      (local.set $stream (call $respond (local.get $out) (local.get $fields)))
      (call $write (local.get $stream) (i32.const 312) (i32.const 8))
      (call $finish (local.get $stream))))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "new-fields" (func $new-fields))
      (export "append" (func $append))
      (export "path" (func $path))
      (export "authority" (func $authority))
      (export "scheme" (func $scheme))
      (export "new-response" (func $new-response))
      (export "response-body" (func $response-body))
      (export "outparam-set" (func $outparam-set))
      (export "body-write" (func $body-write))
      (export "body-finish" (func $body-finish))
      (export "write-flush" (func $write-flush))
      (export "drop-stream" (func $drop-stream))
      (export "consume" (func $consume))
      (export "body-stream" (func $body-stream))
      (export "read" (func $read))
      (export "drop-input" (func $drop-input))
      (export "drop-incoming-body" (func $drop-incoming-body))
      (export "reset" (func $reset))))))

  (func $handle (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $handler))
)
