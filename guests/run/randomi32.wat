;; SPDX-License-Identifier: Apache-2.0
;; randomi32.wat: a host module for wess-syscall.wat's env import, stored at /lib/random.wasm.
;;   randomi32() -> i32       a xorshift32 sequence from the seed 2463534242 (a fresh instance,
;;                            so each call of the importer starts the sequence again): the first
;;                            value is 723471715
(module
  (global $state (mut i32) (i32.const 2463534242))
  (func (export "randomi32") (result i32)
    (local $x i32)
    (local.set $x (global.get $state))
    (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 13))))
    (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 17))))
    (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 5))))
    (global.set $state (local.get $x))
    (local.get $x))
)
