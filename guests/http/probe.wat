;; SPDX-License-Identifier: Apache-2.0
;; probe.wat: a wasi:http handler (@0.2.0 interfaces) that checks the host's semantics, or
;; misbehaves on purpose, by the first letter of its path:
;;   /f  fields: answers 200 with header x-probe: yes (set through fields.append) and the body
;;       "<a> <b> <c> <d> <e> <f> <g>\n", each the outcome of one call: "-" for ok, else the
;;       header-error case (0 invalid-syntax, 1 forbidden, 2 immutable):
;;       a append to the request's headers; b append "connection"; c append "te";
;;       d append "bad name"; e append a value holding "\n"; f from-list with transfer-encoding;
;;       g append to the headers of the response once the response owns them
;;   /p  poll: timers of 0 and 3600 s; body "poll <indexes> ready <r>\n": what poll([long,
;;       short]) returned (expected "1"), and ready() of the long one (expected 0)
;;   /z  blocks on a 3600 s timer (a host must stop it at its deadline)
;;   /a  answers 200 with an empty body (finished, never written), then blocks on a 3600 s
;;       timer: the answer must not wait for it
;;   /s  spins forever in wasm          /t  traps (unreachable)
;;   /n  returns without a response     /2  sets the response twice
;;   /e  answers with error-code internal-error("boom") instead of a response
;;   /c  content-length: 10, writes 5 bytes, finishes     /l  content-length: 2, writes 5 bytes
;;   /u  sets the response, writes "partial", returns without finishing the body
;;   /x  calls wasi:cli/exit with an error
;;   /o  writes "to stdout\n" and "to stderr\n" to its stdout and stderr, answers "ok\n"
;;   /m  tries to grow its memory by 1 GiB; answers "grown\n" or "denied\n"
;; Anything else: 404 with an empty body.
;;
;; Canonical ABI as in echo.wat; fields.append returns result<_, header-error> as (disc u8 +0,
;; case u8 +1); from-list returns result<own<fields>, header-error> (disc +0, payload +4);
;; poll takes (ptr, len) of borrowed handles and returns (ptr, len) of u32s.
(component $C
  (import "wasi:io/error@0.2.0" (instance $error (export "error" (type (sub resource)))))
  (alias export $error "error" (type $io-error))
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.ready" (func (param "self" (borrow $p)) (result bool)))
    (export "[method]pollable.block" (func (param "self" (borrow $p))))
    (export "poll" (func (param "in" (list (borrow $p))) (result (list u32))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
    (alias outer $C $pollable (type $p0))
    (export "pollable" (type $p (eq $p0)))
    (export "subscribe-duration" (func (param "when" u64) (result (own $p))))))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-error (type $e0))
    (export "error" (type $e (eq $e0)))
    (type $se (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $se)))
    (export "output-stream" (type $os (sub resource)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $stream-error)))))))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (export "get-stdout" (func (result (own $os))))))
  (import "wasi:cli/stderr@0.2.0" (instance $stderr
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (export "get-stderr" (func (result (own $os))))))
  (import "wasi:cli/exit@0.2.0" (instance $exit (export "exit" (func (param "status" (result))))))
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
    (type $header-error (variant (case "invalid-syntax") (case "forbidden") (case "immutable")))
    (export "header-error" (type $he (eq $header-error)))
    (export "fields" (type $fields (sub resource)))
    (export "incoming-request" (type $incoming-request (sub resource)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[static]fields.from-list"
      (func (param "entries" (list (tuple string (list u8)))) (result (result (own $fields) (error $he)))))
    (export "[method]fields.append"
      (func (param "self" (borrow $fields)) (param "name" string) (param "value" (list u8))
            (result (result (error $he)))))
    (export "[method]incoming-request.path-with-query"
      (func (param "self" (borrow $incoming-request)) (result (option string))))
    (export "[method]incoming-request.headers" (func (param "self" (borrow $incoming-request)) (result (own $fields))))
    (export "[constructor]outgoing-response" (func (param "headers" (own $fields)) (result (own $outgoing-response))))
    (export "[method]outgoing-response.set-status-code"
      (func (param "self" (borrow $outgoing-response)) (param "status-code" u16) (result (result))))
    (export "[method]outgoing-response.headers"
      (func (param "self" (borrow $outgoing-response)) (result (own $fields))))
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
    (global $heap (mut i32) (i32.const 8192))
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

  (core func $ready (canon lower (func $poll "[method]pollable.ready")))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $poll-list (canon lower (func $poll "poll") (memory $mem) (realloc $realloc)))
  (core func $sleep (canon lower (func $clock "subscribe-duration")))
  (core func $write-flush (canon lower (func $streams "[method]output-stream.blocking-write-and-flush") (memory $mem)))
  (core func $get-stdout (canon lower (func $stdout "get-stdout")))
  (core func $get-stderr (canon lower (func $stderr "get-stderr")))
  (core func $exit (canon lower (func $exit "exit")))
  (core func $new-fields (canon lower (func $types "[constructor]fields")))
  (core func $from-list (canon lower (func $types "[static]fields.from-list") (memory $mem)))
  (core func $append (canon lower (func $types "[method]fields.append") (memory $mem)))
  (core func $path (canon lower (func $types "[method]incoming-request.path-with-query") (memory $mem) (realloc $realloc)))
  (core func $request-headers (canon lower (func $types "[method]incoming-request.headers")))
  (core func $new-response (canon lower (func $types "[constructor]outgoing-response")))
  (core func $set-status (canon lower (func $types "[method]outgoing-response.set-status-code")))
  (core func $response-headers (canon lower (func $types "[method]outgoing-response.headers")))
  (core func $response-body (canon lower (func $types "[method]outgoing-response.body") (memory $mem)))
  (core func $outparam-set (canon lower (func $types "[static]response-outparam.set") (memory $mem)))
  (core func $body-write (canon lower (func $types "[method]outgoing-body.write") (memory $mem)))
  (core func $body-finish (canon lower (func $types "[static]outgoing-body.finish") (memory $mem) (realloc $realloc)))
  (core func $drop-output (canon resource.drop $output-stream))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "ready" (func $ready (param i32) (result i32)))
    (import "host" "block" (func $block (param i32)))
    (import "host" "poll" (func $poll (param i32 i32 i32)))
    (import "host" "sleep" (func $sleep (param i64) (result i32)))
    (import "host" "write-flush" (func $write-flush (param i32 i32 i32 i32)))
    (import "host" "get-stdout" (func $get-stdout (result i32)))
    (import "host" "get-stderr" (func $get-stderr (result i32)))
    (import "host" "exit" (func $exit (param i32)))
    (import "host" "new-fields" (func $new-fields (result i32)))
    (import "host" "from-list" (func $from-list (param i32 i32 i32)))
    (import "host" "append" (func $append (param i32 i32 i32 i32 i32 i32)))
    (import "host" "path" (func $path (param i32 i32)))
    (import "host" "request-headers" (func $request-headers (param i32) (result i32)))
    (import "host" "new-response" (func $new-response (param i32) (result i32)))
    (import "host" "set-status" (func $set-status (param i32 i32) (result i32)))
    (import "host" "response-headers" (func $response-headers (param i32) (result i32)))
    (import "host" "response-body" (func $response-body (param i32 i32)))
    (import "host" "outparam-set" (func $outparam-set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "body-write" (func $body-write (param i32 i32)))
    (import "host" "body-finish" (func $body-finish (param i32 i32 i32 i32)))
    (import "host" "drop-output" (func $drop-output (param i32)))
    ;; strings: field names and values from 1024, texts from 2048, the answer built at 4096
    (data (i32.const 1024) "x-probe")               ;; 7
    (data (i32.const 1040) "yes")                   ;; 3
    (data (i32.const 1048) "connection")            ;; 10
    (data (i32.const 1064) "te")                    ;; 2
    (data (i32.const 1072) "bad name")              ;; 8
    (data (i32.const 1088) "a\nb")                  ;; 3
    (data (i32.const 1096) "transfer-encoding")     ;; 17
    (data (i32.const 1120) "chunked")               ;; 7
    (data (i32.const 1136) "x-late")                ;; 6
    (data (i32.const 1152) "content-length")        ;; 14
    (data (i32.const 1168) "10")                    ;; 2
    (data (i32.const 1176) "2")                     ;; 1
    (data (i32.const 1184) "boom")                  ;; 4
    (data (i32.const 2048) "partial")               ;; 7
    (data (i32.const 2064) "to stdout\n")           ;; 10
    (data (i32.const 2080) "to stderr\n")           ;; 10
    (data (i32.const 2096) "ok\n")                  ;; 3
    (data (i32.const 2112) "grown\n")               ;; 6
    (data (i32.const 2128) "denied\n")              ;; 7
    (data (i32.const 2144) "poll ")                 ;; 5
    (data (i32.const 2160) " ready ")               ;; 7
    (data (i32.const 2176) "12345")                 ;; 5 (12345 bytes written by /c and /l)
    (global $end (mut i32) (i32.const 4096))        ;; the end of the answer built at 4096
    (global $out (mut i32) (i32.const 0))           ;; the response-outparam

    (func $put-byte (param $b i32)
      (i32.store8 (global.get $end) (local.get $b))
      (global.set $end (i32.add (global.get $end) (i32.const 1))))
    (func $put (param $ptr i32) (param $len i32)
      (memory.copy (global.get $end) (local.get $ptr) (local.get $len))
      (global.set $end (i32.add (global.get $end) (local.get $len))))
    ;; "-" for ok, else the header-error case digit, then a space
    (func $put-outcome (param $area i32)
      (call $put-byte (if (result i32) (i32.load8_u (local.get $area))
        (then (i32.add (i32.const 48) (i32.load8_u offset=1 (local.get $area))))
        (else (i32.const 45))))
      (call $put-byte (i32.const 32)))
    (func $append-to (param $fields i32) (param $name i32) (param $name-len i32) (param $value i32) (param $value-len i32)
      (call $append (local.get $fields) (local.get $name) (local.get $name-len) (local.get $value) (local.get $value-len)
                    (i32.const 64))
      (call $put-outcome (i32.const 64)))

    ;; set a response of `status` with `fields`, returning its body
    (func $respond (param $fields i32) (param $status i32) (result i32)
      (call $set-response (call $new-response (local.get $fields)) (local.get $status)))
    (func $set-response (param $response i32) (param $status i32) (result i32)
      (if (call $set-status (local.get $response) (local.get $status)) (then unreachable))
      (call $response-body (local.get $response) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (call $outparam-set (global.get $out) (i32.const 0) (local.get $response) (i32.const 0) (i64.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (i32.load (i32.const 68)))
    (func $stream-of (param $body i32) (result i32)
      (call $body-write (local.get $body) (i32.const 64))
      (if (i32.load8_u (i32.const 64)) (then unreachable))
      (i32.load (i32.const 68)))
    (func $write (param $stream i32) (param $ptr i32) (param $len i32) (result i32)   ;; 0 if it failed
      (call $write-flush (local.get $stream) (local.get $ptr) (local.get $len) (i32.const 80))
      (i32.eqz (i32.load8_u (i32.const 80))))
    (func $finish (param $body i32)
      (call $body-finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 128)))
    ;; a whole answer: status, body bytes
    (func $answer (param $fields i32) (param $status i32) (param $ptr i32) (param $len i32)
      (local $body i32) (local $stream i32)
      (local.set $body (call $respond (local.get $fields) (local.get $status)))
      (local.set $stream (call $stream-of (local.get $body)))
      (drop (call $write (local.get $stream) (local.get $ptr) (local.get $len)))
      (call $drop-output (local.get $stream))
      (call $finish (local.get $body)))
    ;; fields holding content-length: <value>
    (func $with-length (param $value i32) (param $len i32) (result i32)
      (local $fields i32)
      (local.set $fields (call $new-fields))
      (call $append (local.get $fields) (i32.const 1152) (i32.const 14) (local.get $value) (local.get $len) (i32.const 64))
      (local.get $fields))

    (func $probe-fields (param $request i32)
      (local $fields i32) (local $late i32) (local $body i32) (local $stream i32) (local $response i32)
      (call $append-to (call $request-headers (local.get $request)) (i32.const 1024) (i32.const 7) (i32.const 1040) (i32.const 3))
      (local.set $fields (call $new-fields))
      (call $append-to (local.get $fields) (i32.const 1048) (i32.const 10) (i32.const 1040) (i32.const 3))
      (call $append-to (local.get $fields) (i32.const 1064) (i32.const 2) (i32.const 1040) (i32.const 3))
      (call $append-to (local.get $fields) (i32.const 1072) (i32.const 8) (i32.const 1040) (i32.const 3))
      (call $append-to (local.get $fields) (i32.const 1024) (i32.const 7) (i32.const 1088) (i32.const 3))
      ;; from-list([("transfer-encoding", "chunked")]): one 16-byte tuple at 256
      (i32.store (i32.const 256) (i32.const 1096))
      (i32.store (i32.const 260) (i32.const 17))
      (i32.store (i32.const 264) (i32.const 1120))
      (i32.store (i32.const 268) (i32.const 7))
      (call $from-list (i32.const 256) (i32.const 1) (i32.const 64))
      (i32.store8 (i32.const 65) (i32.load8_u (i32.const 68)))
      (call $put-outcome (i32.const 64))
      ;; x-probe: yes is the response's one header; appending to them once the response owns
      ;; them (before it is set: set takes the response away) is refused
      (call $append (local.get $fields) (i32.const 1024) (i32.const 7) (i32.const 1040) (i32.const 3) (i32.const 64))
      (local.set $response (call $new-response (local.get $fields)))
      (local.set $late (call $response-headers (local.get $response)))
      (call $append-to (local.get $late) (i32.const 1136) (i32.const 6) (i32.const 1040) (i32.const 3))
      (local.set $body (call $set-response (local.get $response) (i32.const 200)))
      (global.set $end (i32.sub (global.get $end) (i32.const 1)))
      (call $put-byte (i32.const 10))
      (local.set $stream (call $stream-of (local.get $body)))
      (drop (call $write (local.get $stream) (i32.const 4096) (i32.sub (global.get $end) (i32.const 4096))))
      (call $drop-output (local.get $stream))
      (call $finish (local.get $body)))

    (func $probe-poll
      (local $short i32) (local $long i32) (local $i i32) (local $n i32) (local $list i32)
      (local.set $short (call $sleep (i64.const 0)))
      (local.set $long (call $sleep (i64.const 3600000000000)))
      (i32.store (i32.const 256) (local.get $long))
      (i32.store (i32.const 260) (local.get $short))
      (call $poll (i32.const 256) (i32.const 2) (i32.const 32))
      (local.set $list (i32.load (i32.const 32)))
      (local.set $n (i32.load (i32.const 36)))
      (call $put (i32.const 2144) (i32.const 5))
      (block $done
        (loop $each
          (br_if $done (i32.eq (local.get $i) (local.get $n)))
          (call $put-byte (i32.add (i32.const 48) (i32.load (i32.add (local.get $list) (i32.shl (local.get $i) (i32.const 2))))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $each)))
      (call $put (i32.const 2160) (i32.const 7))
      (call $put-byte (i32.add (i32.const 48) (call $ready (local.get $long))))
      (call $put-byte (i32.const 10))
      (call $answer (call $new-fields) (i32.const 200) (i32.const 4096) (i32.sub (global.get $end) (i32.const 4096))))

    (func (export "handle") (param $request i32) (param $out i32)
      (local $letter i32) (local $body i32) (local $stream i32)
      (global.set $out (local.get $out))
      (call $path (local.get $request) (i32.const 40))
      (if (i32.and (i32.load8_u (i32.const 40)) (i32.ge_u (i32.load (i32.const 48)) (i32.const 2)))
        (then (local.set $letter (i32.load8_u offset=1 (i32.load (i32.const 44))))))
      (block $unknown
        (if (i32.eq (local.get $letter) (i32.const 102)) (then (call $probe-fields (local.get $request)) (return)))  ;; f
        (if (i32.eq (local.get $letter) (i32.const 112)) (then (call $probe-poll) (return)))                     ;; p
        (if (i32.eq (local.get $letter) (i32.const 122))                                                         ;; z
          (then (call $block (call $sleep (i64.const 3600000000000))) (return)))
        (if (i32.eq (local.get $letter) (i32.const 97))                                                          ;; a
          (then
            (call $finish (call $respond (call $new-fields) (i32.const 200)))
            (call $block (call $sleep (i64.const 3600000000000)))
            (return)))
        (if (i32.eq (local.get $letter) (i32.const 115)) (then (loop $forever (br $forever))))                   ;; s
        (if (i32.eq (local.get $letter) (i32.const 116)) (then unreachable))                                     ;; t
        (if (i32.eq (local.get $letter) (i32.const 110)) (then (return)))                                        ;; n
        (if (i32.eq (local.get $letter) (i32.const 50))                                                          ;; 2
          (then
            (call $answer (call $new-fields) (i32.const 200) (i32.const 2096) (i32.const 3))
            (call $answer (call $new-fields) (i32.const 200) (i32.const 2096) (i32.const 3))
            (return)))
        (if (i32.eq (local.get $letter) (i32.const 101))                                                         ;; e
          (then
            ;; err(internal-error(some("boom"))): disc 1, case 38, option disc 1, then ptr, len
            (call $outparam-set (local.get $out) (i32.const 1) (i32.const 38) (i32.const 1) (i64.const 1184)
                                (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 0))
            (return)))
        (if (i32.eq (local.get $letter) (i32.const 99))                                                          ;; c
          (then (call $answer (call $with-length (i32.const 1168) (i32.const 2)) (i32.const 200) (i32.const 2176)
                              (i32.const 5)) (return)))
        (if (i32.eq (local.get $letter) (i32.const 108))                                                         ;; l
          (then (call $answer (call $with-length (i32.const 1176) (i32.const 1)) (i32.const 200) (i32.const 2176)
                              (i32.const 5)) (return)))
        (if (i32.eq (local.get $letter) (i32.const 117))                                                         ;; u
          (then
            (local.set $body (call $respond (call $new-fields) (i32.const 200)))
            (drop (call $write (call $stream-of (local.get $body)) (i32.const 2048) (i32.const 7)))
            (return)))
        (if (i32.eq (local.get $letter) (i32.const 120)) (then (call $exit (i32.const 1)) (return)))            ;; x
        (if (i32.eq (local.get $letter) (i32.const 111))                                                         ;; o
          (then
            (drop (call $write (call $get-stdout) (i32.const 2064) (i32.const 10)))
            (drop (call $write (call $get-stderr) (i32.const 2080) (i32.const 10)))
            (call $answer (call $new-fields) (i32.const 200) (i32.const 2096) (i32.const 3))
            (return)))
        (if (i32.eq (local.get $letter) (i32.const 109))                                                         ;; m
          (then
            (if (i32.eq (memory.grow (i32.const 16384)) (i32.const -1))
              (then (call $answer (call $new-fields) (i32.const 200) (i32.const 2128) (i32.const 7)))
              (else (call $answer (call $new-fields) (i32.const 200) (i32.const 2112) (i32.const 6))))
            (return))))
      (call $answer (call $new-fields) (i32.const 404) (i32.const 0) (i32.const 0))))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "ready" (func $ready))
      (export "block" (func $block))
      (export "poll" (func $poll-list))
      (export "sleep" (func $sleep))
      (export "write-flush" (func $write-flush))
      (export "get-stdout" (func $get-stdout))
      (export "get-stderr" (func $get-stderr))
      (export "exit" (func $exit))
      (export "new-fields" (func $new-fields))
      (export "from-list" (func $from-list))
      (export "append" (func $append))
      (export "path" (func $path))
      (export "request-headers" (func $request-headers))
      (export "new-response" (func $new-response))
      (export "set-status" (func $set-status))
      (export "response-headers" (func $response-headers))
      (export "response-body" (func $response-body))
      (export "outparam-set" (func $outparam-set))
      (export "body-write" (func $body-write))
      (export "body-finish" (func $body-finish))
      (export "drop-output" (func $drop-output))))))

  (func $handle (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.0" (instance $handler))
)
