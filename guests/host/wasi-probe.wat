;; SPDX-License-Identifier: Apache-2.0
;; wasi-probe.wat: what a kvhost guest can see of WASI (no keyvalue imports).
;;   env-count() -> u32    entries of wasi:cli/environment get-environment
;;   dir-count() -> u32    preopened directories (wasi:filesystem/preopens)
;;   bind-probe() -> u32   creates a TCP socket and binds it to 127.0.0.1:0: 0 if that worked,
;;                         100 + error-code if create-tcp-socket failed, 200 + error-code if
;;                         start-bind failed (error-code 1 is access-denied)
;;   wasi:cli/run#run      prints "hello from wasi-probe" on stdout; then, if the first argument
;;                         is "exit", calls wasi:cli/exit exit(ok) (status 0); otherwise fails
;;                         (status 1) when given any argument after the program name
;; Layouts: list results are (ptr, len) at the return pointer; result<own, error-code>: disc +0,
;; handle or error-code +4; result<_, error-code>: disc +0, error-code +1; start-bind's
;; ip-socket-address flattens to a discriminant and 11 i32s (ipv4: port, then 4 octets).
(component $C
  (import "wasi:io/error@0.2.0" (instance $io-error
    (export "error" (type (sub resource)))))
  (alias export $io-error "error" (type $io-err))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $io-err (type $e0))
    (export "error" (type $e (eq $e0)))
    (export "output-stream" (type $os (sub resource)))
    (type $stream-error (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $se (eq $stream-error)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8)) (result (result (error $se)))))))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:cli/stdout@0.2.0" (instance $stdout
    (alias outer $C $output-stream (type $os0))
    (export "output-stream" (type $os (eq $os0)))
    (export "get-stdout" (func (result (own $os))))))
  (import "wasi:cli/environment@0.2.0" (instance $environment
    (export "get-environment" (func (result (list (tuple string string)))))
    (export "get-arguments" (func (result (list string))))))
  (import "wasi:cli/exit@0.2.0" (instance $exit
    (export "exit" (func (param "status" (result))))))
  (import "wasi:sockets/network@0.2.0" (instance $network
    (export "network" (type $net (sub resource)))
    (type $error-code (enum "unknown" "access-denied" "not-supported" "invalid-argument" "out-of-memory"
      "timeout" "concurrency-conflict" "not-in-progress" "would-block" "invalid-state" "new-socket-limit"
      "address-not-bindable" "address-in-use" "remote-unreachable" "connection-refused" "connection-reset"
      "connection-aborted" "datagram-too-large" "name-unresolvable" "temporary-resolver-failure"
      "permanent-resolver-failure"))
    (export "error-code" (type $ec (eq $error-code)))
    (type $family (enum "ipv4" "ipv6"))
    (export "ip-address-family" (type $fam (eq $family)))
    (type $v4 (tuple u8 u8 u8 u8))
    (export "ipv4-address" (type $v4e (eq $v4)))
    (type $v6 (tuple u16 u16 u16 u16 u16 u16 u16 u16))
    (export "ipv6-address" (type $v6e (eq $v6)))
    (type $v4sa (record (field "port" u16) (field "address" $v4e)))
    (export "ipv4-socket-address" (type $v4sae (eq $v4sa)))
    (type $v6sa (record (field "port" u16) (field "flow-info" u32) (field "address" $v6e) (field "scope-id" u32)))
    (export "ipv6-socket-address" (type $v6sae (eq $v6sa)))
    (type $sa (variant (case "ipv4" $v4sae) (case "ipv6" $v6sae)))
    (export "ip-socket-address" (type $sae (eq $sa)))))
  (alias export $network "network" (type $net))
  (alias export $network "error-code" (type $error-code))
  (alias export $network "ip-address-family" (type $family))
  (alias export $network "ip-socket-address" (type $socket-address))
  (import "wasi:sockets/instance-network@0.2.0" (instance $instance-network
    (alias outer $C $net (type $n0))
    (export "network" (type $n (eq $n0)))
    (export "instance-network" (func (result (own $n))))))
  (import "wasi:sockets/tcp@0.2.0" (instance $tcp
    (alias outer $C $net (type $n0))
    (export "network" (type $n (eq $n0)))
    (alias outer $C $error-code (type $ec0))
    (export "error-code" (type $ec (eq $ec0)))
    (alias outer $C $socket-address (type $sa0))
    (export "ip-socket-address" (type $sa (eq $sa0)))
    (export "tcp-socket" (type $sock (sub resource)))
    (export "[method]tcp-socket.start-bind"
      (func (param "self" (borrow $sock)) (param "network" (borrow $n)) (param "local-address" $sa)
        (result (result (error $ec)))))))
  (alias export $tcp "tcp-socket" (type $tcp-socket))
  (import "wasi:sockets/tcp-create-socket@0.2.0" (instance $tcp-create
    (alias outer $C $error-code (type $ec0))
    (export "error-code" (type $ec (eq $ec0)))
    (alias outer $C $family (type $f0))
    (export "ip-address-family" (type $f (eq $f0)))
    (alias outer $C $tcp-socket (type $s0))
    (export "tcp-socket" (type $s (eq $s0)))
    (export "create-tcp-socket" (func (param "address-family" $f) (result (result (own $s) (error $ec)))))))
  (import "wasi:filesystem/types@0.2.0" (instance $fs-types
    (export "descriptor" (type (sub resource)))))
  (alias export $fs-types "descriptor" (type $descriptor))
  (import "wasi:filesystem/preopens@0.2.0" (instance $preopens
    (alias outer $C $descriptor (type $d0))
    (export "descriptor" (type $d (eq $d0)))
    (export "get-directories" (func (result (list (tuple (own $d) string)))))))

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
      (local.get $p))
  )
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))
  (core func $get-environment (canon lower (func $environment "get-environment") (memory $mem) (realloc $realloc)))
  (core func $get-arguments (canon lower (func $environment "get-arguments") (memory $mem) (realloc $realloc)))
  (core func $get-directories (canon lower (func $preopens "get-directories") (memory $mem) (realloc $realloc)))
  (core func $get-stdout (canon lower (func $stdout "get-stdout")))
  (core func $write (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
    (memory $mem) (realloc $realloc)))
  (core func $drop-stream (canon resource.drop $output-stream))
  (core func $exit (canon lower (func $exit "exit")))
  (core func $instance-network (canon lower (func $instance-network "instance-network")))
  (core func $create-tcp-socket (canon lower (func $tcp-create "create-tcp-socket") (memory $mem)))
  (core func $start-bind (canon lower (func $tcp "[method]tcp-socket.start-bind") (memory $mem)))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "host" "get-environment" (func $get-environment (param i32)))
    (import "host" "get-arguments" (func $get-arguments (param i32)))
    (import "host" "get-directories" (func $get-directories (param i32)))
    (import "host" "get-stdout" (func $get-stdout (result i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (import "host" "exit" (func $exit (param i32)))
    (import "host" "instance-network" (func $instance-network (result i32)))
    (import "host" "create-tcp-socket" (func $create-tcp-socket (param i32 i32)))
    (import "host" "start-bind" (func $start-bind
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
    (data (i32.const 64) "hello from wasi-probe\n")
    (func (export "env-count") (result i32)
      (call $get-environment (i32.const 16))
      (i32.load (i32.const 20)))
    (func (export "dir-count") (result i32)
      (call $get-directories (i32.const 16))
      (i32.load (i32.const 20)))
    (func (export "bind-probe") (result i32)
      (local $net i32)
      (local.set $net (call $instance-network))
      (call $create-tcp-socket (i32.const 0) (i32.const 32))          ;; ipv4
      (if (i32.load8_u (i32.const 32))
        (then (return (i32.add (i32.const 100) (i32.load8_u (i32.const 36))))))
      ;; start-bind(socket, network, ipv4 { port 0, 127.0.0.1 }) -> result at 48
      (call $start-bind (i32.load (i32.const 36)) (local.get $net)
        (i32.const 0) (i32.const 0) (i32.const 127) (i32.const 0) (i32.const 0) (i32.const 1)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
        (i32.const 48))
      (if (result i32) (i32.load8_u (i32.const 48))
        (then (i32.add (i32.const 200) (i32.load8_u (i32.const 49))))
        (else (i32.const 0))))

    (func (export "run") (result i32)
      (local $out i32)
      (local.set $out (call $get-stdout))
      (call $write (local.get $out) (i32.const 64) (i32.const 22) (i32.const 32))
      (call $drop-stream (local.get $out))
      (call $get-arguments (i32.const 16))
      ;; argument 1 is the list entry at +8: (ptr, len); "exit" is 0x74697865 little-endian
      (if (i32.gt_u (i32.load (i32.const 20)) (i32.const 1))
        (then
          (if (i32.and (i32.eq (i32.load offset=12 (i32.load (i32.const 16))) (i32.const 4))
                       (i32.eq (i32.load (i32.load offset=8 (i32.load (i32.const 16)))) (i32.const 0x74697865)))
            (then (call $exit (i32.const 0))))))
      (i32.gt_u (i32.load (i32.const 20)) (i32.const 1)))
  )
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "host" (instance
      (export "get-environment" (func $get-environment)) (export "get-arguments" (func $get-arguments))
      (export "get-directories" (func $get-directories)) (export "get-stdout" (func $get-stdout))
      (export "write" (func $write)) (export "drop-stream" (func $drop-stream)) (export "exit" (func $exit))
      (export "instance-network" (func $instance-network)) (export "create-tcp-socket" (func $create-tcp-socket))
      (export "start-bind" (func $start-bind))))))
  (func (export "env-count") (result u32) (canon lift (core func $main "env-count")))
  (func (export "dir-count") (result u32) (canon lift (core func $main "dir-count")))
  (func (export "bind-probe") (result u32) (canon lift (core func $main "bind-probe")))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance))
)
