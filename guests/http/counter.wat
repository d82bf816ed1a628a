;; SPDX-License-Identifier: Apache-2.0
;; counter.wat: a wasi:http handler (@0.2.0 interfaces) that keeps durable state in
;; wasi:keyvalue@0.2.0-draft2: every request increments key "visits" of the default bucket
;; (open("")) and answers 200 "visits=<N>\n"; a wasi:keyvalue error answers 500 "kv error\n".
;; Its data lives in the namespace the host serves it in (for a stored app: its path), so the
;; count survives requests, new versions and restarts, and two apps never share it.
;;
;; Canonical ABI: open -> result<own<bucket>, error> (disc +0, handle or error +4);
;; increment(bucket, key, delta: s64) -> result<s64, error> (disc +0, s64 or error at +8).
;; The rest as in hello.wat.
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
    (export "[method]outgoing-response.set-status-code"
      (func (param "self" (borrow $outgoing-response)) (param "status-code" u16) (result (result))))
    (export "[method]outgoing-response.body"
      (func (param "self" (borrow $outgoing-response)) (result (result (own $outgoing-body)))))
    (export "[static]response-outparam.set"
      (func (param "param" (own $response-outparam)) (param "response" (result (own $outgoing-response) (error $ec)))))
    (export "[method]outgoing-body.write" (func (param "self" (borrow $outgoing-body)) (result (result (own $os)))))
    (export "[static]outgoing-body.finish"
      (func (param "this" (own $outgoing-body)) (param "trailers" (option (own $fields))) (result (result (error $ec)))))))
  (alias export $types "incoming-request" (type $incoming-request))
  (alias export $types "response-outparam" (type $response-outparam))

  (import "wasi:keyvalue/store@0.2.0-draft2" (instance $store
    (export "bucket" (type $bucket (sub resource)))
    (type $error (variant (case "no-such-store") (case "access-denied") (case "other" string)))
    (export "error" (type $err (eq $error)))
    (export "open" (func (param "identifier" string) (result (result (own $bucket) (error $err)))))))
  (alias export $store "bucket" (type $bucket))
  (alias export $store "error" (type $kv-error))
  (import "wasi:keyvalue/atomics@0.2.0-draft2" (instance $atomics
    (alias outer $C $bucket (type $bucket0))
    (export "bucket" (type $b (eq $bucket0)))
    (alias outer $C $kv-error (type $error0))
    (export "error" (type $err (eq $error0)))
    (export "increment" (func (param "bucket" (borrow $b)) (param "key" string) (param "delta" s64)
      (result (result s64 (error $err)))))))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))) (then unreachable))
      (local.get $p)))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $open (canon lower (func $store "open") (memory $mem) (realloc $realloc)))
  (core func $increment (canon lower (func $atomics "increment") (memory $mem) (realloc $realloc)))
  (core func $drop-bucket (canon resource.drop $bucket))
  (core func $new-fields (canon lower (func $types "[constructor]fields")))
  (core func $new-response (canon lower (func $types "[constructor]outgoing-response")))
  (core func $set-status (canon lower (func $types "[method]outgoing-response.set-status-code")))
  (core func $response-body (canon lower (func $types "[method]outgoing-response.body") (memory $mem)))
  (core func $outparam-set (canon lower (func $types "[static]response-outparam.set") (memory $mem)))
  (core func $body-write (canon lower (func $types "[method]outgoing-body.write") (memory $mem)))
  (core func $body-finish (canon lower (func $types "[static]outgoing-body.finish") (memory $mem) (realloc $realloc)))
  (core func $write-flush (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $drop-stream (canon resource.drop $output-stream))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "open" (func $open (param i32 i32 i32)))
    (import "host" "increment" (func $increment (param i32 i32 i32 i64 i32)))
    (import "host" "drop-bucket" (func $drop-bucket (param i32)))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "new-response" (func $new-response (param i32) (result i32)))
    (import "host" "set-status" (func $set-status (param i32 i32) (result i32)))
    (import "host" "response-body" (func $response-body (param i32 i32)))
    (import "host" "outparam-set" (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "body-write" (func $body-write (param i32 i32)))
    (import "host" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "host" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (data (i32.const 256) "visits")               ;; 6
    (data (i32.const 272) "kv error\n")           ;; 9
    (data (i32.const 288) "visits=")              ;; 7, then the number and "\n" are written after it

    (func $answer (param $out i32) (param $status i32) (param $ptr i32) (param $len i32)
      (local $response i32) (local $body i32) (local $stream i32)
      (local.set $response (call $new-response (call $new-fields)))
      (if (call $set-status (local.get $response) (local.get $status)) (then unreachable))
      (call $response-body (local.get $response) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $body (i32.load (i32.const 68)))
      (call $outparam-set (local.get $out) (i32.const 0) (local.get $response) (i32.const 0) (i64.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $body-write (local.get $body) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $stream (i32.load (i32.const 68)))
      (call $write-flush (local.get $stream) (local.get $ptr) (local.get $len) (i32.const 64))
      (call $drop-stream (local.get $stream))
      (call $body-finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 128)))

    (func (export "handle") (param $request i32) (param $out i32)
      (local $bucket i32) (local $n i64) (local $digits i32) (local $end i32) (local $i i32)
      (call $open (i32.const 0) (i32.const 0) (i32.const 16))
      (if (i32.load8_u (i32.const 16))
        (then (call $answer (local.get $out) (i32.const 500) (i32.const 272) (i32.const 9)) (return)))
      (local.set $bucket (i32.load (i32.const 20)))
      (call $increment (local.get $bucket) (i32.const 256) (i32.const 6) (i64.const 1) (i32.const 32))
      (call $drop-bucket (local.get $bucket))
      (if (i32.load8_u (i32.const 32))
        (then (call $answer (local.get $out) (i32.const 500) (i32.const 272) (i32.const 9)) (return)))
      ;; "visits=" then the decimal digits of the count (at least one), then "\n"
      (local.set $n (i64.load (i32.const 40)))
      (local.set $digits (i32.const 1))
      (local.set $i (i32.wrap_i64 (i64.div_u (local.get $n) (i64.const 10))))
      (block $counted
        (loop $more
          (br_if $counted (i32.eqz (local.get $i)))
          (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
          (local.set $i (i32.div_u (local.get $i) (i32.const 10)))
          (br $more)))
      (local.set $end (i32.add (i32.const 295) (local.get $digits)))
      (i32.store8 (local.get $end) (i32.const 10))
      (local.set $i (local.get $end))
      (loop $digit
        (local.set $i (i32.sub (local.get $i) (i32.const 1)))
        (i32.store8 (local.get $i) (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $n) (i64.const 10)))))
        (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
        (br_if $digit (i32.gt_u (local.get $i) (i32.const 295))))
      (call $answer (local.get $out) (i32.const 200) (i32.const 288) (i32.sub (i32.add (local.get $end) (i32.const 1))
                                                                           (i32.const 288)))))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "open" (func $open))
      (export "increment" (func $increment))
      (export "drop-bucket" (func $drop-bucket))
      (export "new-fields" (func $new-fields))
      (export "new-response" (func $new-response))
      (export "set-status" (func $set-status))
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
