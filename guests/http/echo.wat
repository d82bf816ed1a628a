;; SPDX-License-Identifier: Apache-2.0
;; echo.wat: a wasi:http handler (the wasi:http/proxy world, @0.2.0 interfaces) that answers
;; with what it was sent, streamed:
;;   body = "<METHOD> <path-with-query>\n" + "<name>: <value>\n" for each request header (as
;;          fields.entries gives them) + "\n" + the request body, copied chunk by chunk as it
;;          arrives (blocking-read of up to 64 KiB, then check-write / write, waiting on the
;;          stream's pollable when check-write permits nothing): never whole in memory;
;;   status 200, except for a path starting /404 (404) or /500 (500): the app's own errors;
;;   a path starting /stream answers the head, then 16 chunks "chunk NN\n" (NN = 00..15), each
;;          its own blocking-write-and-flush, instead of copying the request body.
;; The response has no headers (so a server sends it chunked).
;;
;; Canonical ABI (return areas): method -> variant (disc u8 +0, other's string +4); option<string>
;; disc +0, string +4; list<tuple<string, list<u8>>> (ptr +0, len +4), 16-byte elements;
;; result<own<T>> disc +0, handle +4; result<list<u8>, stream-error> disc +0, list or error +4;
;; result<u64, stream-error> disc +0, u64 or error at +8; result<_, stream-error> 12 bytes;
;; result<_, error-code> 40 bytes. response-outparam.set takes 9 flat values (see hello.wat).
(component $C
  (import "wasi:io/error@0.2.0" (instance $error (export "error" (type (sub resource)))))
  (alias export $error "error" (type $io-error))
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $p))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-error (type $e0))
    (export "error" (type $e (eq $e0)))
    (alias outer $C $pollable (type $p0))
    (export "pollable" (type $p (eq $p0)))
    (type $se (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $se)))
    (export "input-stream" (type $is (sub resource)))
    (export "output-stream" (type $os (sub resource)))
    (export "[method]input-stream.blocking-read"
      (func (param "self" (borrow $is)) (param "len" u64) (result (result (list u8) (error $stream-error)))))
    (export "[method]output-stream.check-write"
      (func (param "self" (borrow $os)) (result (result u64 (error $stream-error)))))
    (export "[method]output-stream.write"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $stream-error)))))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $stream-error)))))
    (export "[method]output-stream.subscribe" (func (param "self" (borrow $os)) (result (own $p))))))
  (alias export $streams "input-stream" (type $input-stream))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:http/types@0.2.0" (instance $types
    (alias outer $C $input-stream (type $is0))
    (export "input-stream" (type $is (eq $is0)))
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (type $method (variant (case "get") (case "head") (case "post") (case "put") (case "delete")
      (case "connect") (case "options") (case "trace") (case "patch") (case "other" string)))
    (export "method" (type $m (eq $method)))
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
    (export "incoming-body" (type $incoming-body (sub resource)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[method]fields.entries"
      (func (param "self" (borrow $fields)) (result (list (tuple string (list u8))))))
    (export "[method]incoming-request.method" (func (param "self" (borrow $incoming-request)) (result $m)))
    (export "[method]incoming-request.path-with-query"
      (func (param "self" (borrow $incoming-request)) (result (option string))))
    (export "[method]incoming-request.headers" (func (param "self" (borrow $incoming-request)) (result (own $fields))))
    (export "[method]incoming-request.consume"
      (func (param "self" (borrow $incoming-request)) (result (result (own $incoming-body)))))
    (export "[method]incoming-body.stream" (func (param "self" (borrow $incoming-body)) (result (result (own $is)))))
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
  (alias export $types "fields" (type $fields))
  (alias export $types "incoming-request" (type $incoming-request))
  (alias export $types "incoming-body" (type $incoming-body))
  (alias export $types "response-outparam" (type $response-outparam))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 4096))
    ;; Bump allocator; `mark` / `release` free everything allocated since the mark.
    (func (export "realloc") (param $old i32) (param $old-size i32) (param $align i32) (param $size i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get $align))))
      (global.set $heap (i32.add (local.get $p) (local.get $size)))
      (block $fits
        (loop $grow
          (br_if $fits (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
          (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
          (br $grow)))
      (local.get $p))
    (func (export "mark") (result i32) (global.get $heap))
    (func (export "release") (param i32) (global.set $heap (local.get 0))))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $read (canon lower (func $streams "[method]input-stream.blocking-read") (memory $mem) (realloc $realloc)))
  (core func $check-write (canon lower (func $streams "[method]output-stream.check-write") (memory $mem)))
  (core func $write (canon lower (func $streams "[method]output-stream.write") (memory $mem)))
  (core func $write-flush (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $subscribe (canon lower (func $streams "[method]output-stream.subscribe")))
  (core func $new-fields (canon lower (func $types "[constructor]fields")))
  (core func $entries (canon lower (func $types "[method]fields.entries") (memory $mem) (realloc $realloc)))
  (core func $method (canon lower (func $types "[method]incoming-request.method") (memory $mem) (realloc $realloc)))
  (core func $path (canon lower (func $types "[method]incoming-request.path-with-query") (memory $mem) (realloc $realloc)))
  (core func $headers (canon lower (func $types "[method]incoming-request.headers")))
  (core func $consume (canon lower (func $types "[method]incoming-request.consume") (memory $mem)))
  (core func $body-stream (canon lower (func $types "[method]incoming-body.stream") (memory $mem)))
  (core func $new-response (canon lower (func $types "[constructor]outgoing-response")))
  (core func $set-status (canon lower (func $types "[method]outgoing-response.set-status-code")))
  (core func $response-body (canon lower (func $types "[method]outgoing-response.body") (memory $mem)))
  (core func $outparam-set (canon lower (func $types "[static]response-outparam.set") (memory $mem)))
  (core func $body-write (canon lower (func $types "[method]outgoing-body.write") (memory $mem)))
  (core func $body-finish (canon lower (func $types "[static]outgoing-body.finish") (memory $mem) (realloc $realloc)))
  (core func $drop-pollable (canon resource.drop $pollable))
  (core func $drop-input (canon resource.drop $input-stream))
  (core func $drop-output (canon resource.drop $output-stream))
  (core func $drop-fields (canon resource.drop $fields))
  (core func $drop-incoming-body (canon resource.drop $incoming-body))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "libc" "realloc" (func $realloc (param i32 i32 i32 i32) (result i32)))
    (import "libc" "mark" (func $mark (result i32)))
    (import "libc" "release" (func $release (param i32)))
    (import "host" "block" (func $block (param i32)))
    (import "host" "read" (func $read (param i32 i64 i32)))
    (import "host" "check-write" (func $check-write (param i32 i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "host" "subscribe" (func $subscribe (param i32) (result i32)))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "entries" (func $entries (param i32 i32)))
    (import "host" "method" (func $method (param i32 i32)))
    (import "host" "path" (func $path (param i32 i32)))
    (import "host" "headers" (func $headers (param i32) (result i32)))
    (import "host" "consume" (func $consume (param i32 i32)))
    (import "host" "body-stream" (func $body-stream (param i32 i32)))
    (import "host" "new-response" (func $new-response (param i32) (result i32)))
    (import "host" "set-status" (func $set-status (param i32 i32) (result i32)))
    (import "host" "response-body" (func $response-body (param i32 i32)))
    (import "host" "outparam-set" (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "body-write" (func $body-write (param i32 i32)))
    (import "host" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "host" "drop-pollable" (func $drop-pollable (param i32)))
    (import "host" "drop-input" (func $drop-input (param i32)))
    (import "host" "drop-output" (func $drop-output (param i32)))
    (import "host" "drop-fields" (func $drop-fields (param i32)))
    (import "host" "drop-incoming-body" (func $drop-incoming-body (param i32)))
    ;; method names, 8 bytes apart from 512; their lengths from 600; "chunk NN\n" at 640
    (data (i32.const 512) "GET     HEAD    POST    PUT     DELETE  CONNECT OPTIONS TRACE   PATCH   ")
    (data (i32.const 600) "\03\04\04\03\06\07\07\05\05")
    (data (i32.const 640) "chunk 00\n")
    (global $out-stream (mut i32) (i32.const 0))
    (global $head (mut i32) (i32.const 0))         ;; the head being built: start and end
    (global $head-end (mut i32) (i32.const 0))

    (func $append (param $ptr i32) (param $len i32)
      (memory.copy (global.get $head-end) (local.get $ptr) (local.get $len))
      (global.set $head-end (i32.add (global.get $head-end) (local.get $len))))
    (func $append-byte (param $b i32)
      (i32.store8 (global.get $head-end) (local.get $b))
      (global.set $head-end (i32.add (global.get $head-end) (i32.const 1))))

    ;; write all of [ptr, ptr+len) to the response stream; 0 if the stream failed
    (func $write-all (param $ptr i32) (param $len i32) (result i32)
      (local $n i32) (local $p i32)
      (block $done
        (loop $more
          (br_if $done (i32.eqz (local.get $len)))
          (call $check-write (global.get $out-stream) (i32.const 96))
          (if (i32.load8_u (i32.const 96)) (then (return (i32.const 0))))
          (local.set $n (i32.wrap_i64 (i64.load (i32.const 104))))
          (if (i32.eqz (local.get $n))
            (then
              (local.set $p (call $subscribe (global.get $out-stream)))
              (call $block (local.get $p))
              (call $drop-pollable (local.get $p))
              (br $more)))
          (if (i32.gt_u (local.get $n) (local.get $len)) (then (local.set $n (local.get $len))))
          (call $write (global.get $out-stream) (local.get $ptr) (local.get $n) (i32.const 80))
          (if (i32.load8_u (i32.const 80)) (then (return (i32.const 0))))
          (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
          (local.set $len (i32.sub (local.get $len) (local.get $n)))
          (br $more)))
      (i32.const 1))

    (func $path-starts (param $p0 i32) (param $p1 i32) (param $p2 i32) (param $p3 i32) (result i32)
      ;; the path (at 40: disc, 44: ptr, 48: len) starts with the 4 given bytes
      (local $ptr i32)
      (if (i32.eqz (i32.load8_u (i32.const 40))) (then (return (i32.const 0))))
      (if (i32.lt_u (i32.load (i32.const 48)) (i32.const 4)) (then (return (i32.const 0))))
      (local.set $ptr (i32.load (i32.const 44)))
      (i32.and (i32.and (i32.eq (i32.load8_u (local.get $ptr)) (local.get $p0))
                        (i32.eq (i32.load8_u offset=1 (local.get $ptr)) (local.get $p1)))
               (i32.and (i32.eq (i32.load8_u offset=2 (local.get $ptr)) (local.get $p2))
                        (i32.eq (i32.load8_u offset=3 (local.get $ptr)) (local.get $p3)))))

    (func (export "handle") (param $request i32) (param $out i32)
      (local $case i32) (local $headers i32) (local $list i32) (local $n i32) (local $i i32) (local $e i32)
      (local $size i32) (local $response i32) (local $body i32) (local $incoming i32) (local $in i32)
      (local $mark i32) (local $status i32)
      ;; method (at 16), path (at 40), header entries (at 32)
      (call $method (local.get $request) (i32.const 16))
      (call $path (local.get $request) (i32.const 40))
      (local.set $headers (call $headers (local.get $request)))
      (call $entries (local.get $headers) (i32.const 32))
      (local.set $list (i32.load (i32.const 32)))
      (local.set $n (i32.load (i32.const 36)))
      ;; the head's size: method, space, path, newline, each "name: value\n", newline
      (local.set $case (i32.load8_u (i32.const 16)))
      (local.set $size (i32.add (i32.const 3) (i32.load (i32.const 48))))
      (local.set $size (i32.add (local.get $size)
        (if (result i32) (i32.eq (local.get $case) (i32.const 9))
          (then (i32.load (i32.const 24)))
          (else (i32.load8_u (i32.add (i32.const 600) (local.get $case)))))))
      (local.set $i (i32.const 0))
      (block $sized
        (loop $each
          (br_if $sized (i32.eq (local.get $i) (local.get $n)))
          (local.set $e (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 4))))
          (local.set $size (i32.add (local.get $size)
            (i32.add (i32.const 3) (i32.add (i32.load offset=4 (local.get $e)) (i32.load offset=12 (local.get $e))))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $each)))
      (global.set $head (call $realloc (i32.const 0) (i32.const 0) (i32.const 1) (local.get $size)))
      (global.set $head-end (global.get $head))
      (if (i32.eq (local.get $case) (i32.const 9))
        (then (call $append (i32.load (i32.const 20)) (i32.load (i32.const 24))))
        (else (call $append (i32.add (i32.const 512) (i32.shl (local.get $case) (i32.const 3)))
                            (i32.load8_u (i32.add (i32.const 600) (local.get $case))))))
      (call $append-byte (i32.const 32))
      (if (i32.load8_u (i32.const 40)) (then (call $append (i32.load (i32.const 44)) (i32.load (i32.const 48)))))
      (call $append-byte (i32.const 10))
      (local.set $i (i32.const 0))
      (block $listed
        (loop $each
          (br_if $listed (i32.eq (local.get $i) (local.get $n)))
          (local.set $e (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 4))))
          (call $append (i32.load (local.get $e)) (i32.load offset=4 (local.get $e)))
          (call $append-byte (i32.const 58))
          (call $append-byte (i32.const 32))
          (call $append (i32.load offset=8 (local.get $e)) (i32.load offset=12 (local.get $e)))
          (call $append-byte (i32.const 10))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $each)))
      (call $append-byte (i32.const 10))
      (call $drop-fields (local.get $headers))
      ;; the response: status by path, no headers
      (local.set $status (i32.const 200))
      (if (call $path-starts (i32.const 47) (i32.const 52) (i32.const 48) (i32.const 52))    ;; "/404"
        (then (local.set $status (i32.const 404))))
      (if (call $path-starts (i32.const 47) (i32.const 53) (i32.const 48) (i32.const 48))    ;; "/500"
        (then (local.set $status (i32.const 500))))
      (local.set $response (call $new-response (call $new-fields)))
      (if (call $set-status (local.get $response) (local.get $status)) (then unreachable))
      (call $response-body (local.get $response) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (local.set $body (i32.load (i32.const 68)))
      (call $outparam-set (local.get $out) (i32.const 0) (local.get $response) (i32.const 0) (i64.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $body-write (local.get $body) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (global.set $out-stream (i32.load (i32.const 68)))
      (if (i32.eqz (call $write-all (global.get $head) (i32.sub (global.get $head-end) (global.get $head))))
        (then (return)))
      (if (call $path-starts (i32.const 47) (i32.const 115) (i32.const 116) (i32.const 114))   ;; "/str"
        (then
          (local.set $i (i32.const 0))
          (block $chunked
            (loop $each
              (br_if $chunked (i32.eq (local.get $i) (i32.const 16)))
              (i32.store8 (i32.const 646) (i32.add (i32.const 48) (i32.div_u (local.get $i) (i32.const 10))))
              (i32.store8 (i32.const 647) (i32.add (i32.const 48) (i32.rem_u (local.get $i) (i32.const 10))))
              (call $write-flush (global.get $out-stream) (i32.const 640) (i32.const 9) (i32.const 80))
              (if (i32.load8_u (i32.const 80)) (then (return)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $each))))
        (else
          ;; copy the request body as it arrives
          (call $consume (local.get $request) (i32.const 64))
          (if (i32.load8_u (i32.const 64)) (then unreachable))
          (local.set $incoming (i32.load (i32.const 68)))
          (call $body-stream (local.get $incoming) (i32.const 64))
          (if (i32.load8_u (i32.const 64)) (then unreachable))
          (local.set $in (i32.load (i32.const 68)))
          (local.set $mark (call $mark))
          (block $copied
            (loop $each
              (call $read (local.get $in) (i64.const 65536) (i32.const 64))
              (br_if $copied (i32.load8_u (i32.const 64)))                        ;; closed: the end
              (if (i32.eqz (call $write-all (i32.load (i32.const 68)) (i32.load (i32.const 72))))
                (then (return)))
              (call $release (local.get $mark))
              (br $each)))
          (call $drop-input (local.get $in))
          (call $drop-incoming-body (local.get $incoming))))
      (call $drop-output (global.get $out-stream))
      (call $body-finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 128))
      (if (i32.load8_u (i32.const 128)) (then unreachable))))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "block" (func $block))
      (export "read" (func $read))
      (export "check-write" (func $check-write))
      (export "write" (func $write))
      (export "write-flush" (func $write-flush))
      (export "subscribe" (func $subscribe))
      (export "new-fields" (func $new-fields))
      (export "entries" (func $entries))
      (export "method" (func $method))
      (export "path" (func $path))
      (export "headers" (func $headers))
      (export "consume" (func $consume))
      (export "body-stream" (func $body-stream))
      (export "new-response" (func $new-response))
      (export "set-status" (func $set-status))
      (export "response-body" (func $response-body))
      (export "outparam-set" (func $outparam-set))
      (export "body-write" (func $body-write))
      (export "body-finish" (func $body-finish))
      (export "drop-pollable" (func $drop-pollable))
      (export "drop-input" (func $drop-input))
      (export "drop-output" (func $drop-output))
      (export "drop-fields" (func $drop-fields))
      (export "drop-incoming-body" (func $drop-incoming-body))))))

  (func $handle (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $handler))
)
