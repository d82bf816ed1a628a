;; SPDX-License-Identifier: Apache-2.0
;; p2-sleep.wat: a WASIp2 component that blocks inside a host call, where neither epoch
;; interruption nor fuel can reach it.
;;   imports  wasi:io/poll@0.2.0 (resource pollable, [method]pollable.block),
;;            wasi:clocks/monotonic-clock@0.2.0 (subscribe-duration: func(when: duration) ->
;;            pollable; duration = u64 nanoseconds)
;;   sleep: func(ms: u64)          subscribes for ms milliseconds, blocks on the pollable, drops it
;;   wasi:cli/run@0.2.0 run        sleeps one hour (3,600,000 ms), then returns ok
;; Instantiates with wasmtime's add_wasip2() alone (it provides both imports).
;; Canonical ABI: no memory is needed: subscribe-duration lowers to (i64) -> i32 (the own handle),
;; pollable.block to (i32) (the borrowed handle), run's result<_, _> lifts from an i32 (0 = ok).
(component $C
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $p))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
    (alias outer $C $pollable (type $p0))
    (export "pollable" (type $p (eq $p0)))
    (export "subscribe-duration" (func (param "when" u64) (result (own $p))))))

  (core func $subscribe-duration (canon lower (func $clock "subscribe-duration")))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $drop-pollable (canon resource.drop $pollable))

  (core module $Main
    (import "host" "subscribe-duration" (func $subscribe-duration (param i64) (result i32)))
    (import "host" "block" (func $block (param i32)))
    (import "host" "drop-pollable" (func $drop-pollable (param i32)))
    (func $sleep (export "sleep") (param $ms i64)
      (local $pollable i32)
      (local.set $pollable (call $subscribe-duration (i64.mul (local.get $ms) (i64.const 1000000))))
      (call $block (local.get $pollable))
      (call $drop-pollable (local.get $pollable)))
    (func (export "run") (result i32)
      (call $sleep (i64.const 3600000))
      (i32.const 0))
  )
  (core instance $main (instantiate $Main
    (with "host" (instance
      (export "subscribe-duration" (func $subscribe-duration))
      (export "block" (func $block))
      (export "drop-pollable" (func $drop-pollable))))))

  (func (export "sleep") (param "ms" u64) (canon lift (core func $main "sleep")))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance))
)
