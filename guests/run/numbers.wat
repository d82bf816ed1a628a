;; SPDX-License-Identifier: Apache-2.0
;; numbers.wat: a core module (no imports) with every core value type, for JSON callers.
;;   add(i32, i32) -> i32             wrapping sum: add(2147483647, 1) = -2147483648
;;   add64(i64, i64) -> i64           wrapping sum
;;   mulf32(f32, f32) -> f32          product (f32 precision: mulf32(0.1, 3) = 0.30000001192...)
;;   divf64(f64, f64) -> f64          quotient: 1/0 = inf, -1/0 = -inf, 0/0 = NaN
;;   neg64(i64) -> i64                0 - x (neg64(-9223372036854775808) wraps to itself)
;;   pair(i32) -> (i32, i64)          multi-value: (x, x * 2^32), e.g. pair(7) = (7, 30064771072)
;;   nothing()                        no params, no results; adds 1 to the global "calls"
;;   get() -> i32                     the global "calls": 0 in a fresh instance, so a host that
;;                                    instantiates per call answers 0 after any number of nothing()
;;   trap()                           traps (unreachable)
;;   spin()                           loops forever (only a timeout or fuel limit ends it)
;;   grow(pages: i32) -> i32          memory.grow: the old size in pages, or -1 when refused
;;   touch(pages: i32)                grows memory by pages and writes one byte per 4 KiB page of
;;                                    the new memory, so the host's resident memory really grows;
;;                                    traps (unreachable) when the growth is refused
;;   takes_ref(externref) -> i32      1 if the reference is null, else 0 (not a JSON type)
;; Non-function exports, which must not be listed as callable: memory "memory" (1 page, no
;; maximum) and global "calls" (mutable i32).
(module
  (memory (export "memory") 1)
  (global $calls (export "calls") (mut i32) (i32.const 0))

  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b)))
  (func (export "add64") (param $a i64) (param $b i64) (result i64)
    (i64.add (local.get $a) (local.get $b)))
  (func (export "mulf32") (param $a f32) (param $b f32) (result f32)
    (f32.mul (local.get $a) (local.get $b)))
  (func (export "divf64") (param $a f64) (param $b f64) (result f64)
    (f64.div (local.get $a) (local.get $b)))
  (func (export "neg64") (param $x i64) (result i64)
    (i64.sub (i64.const 0) (local.get $x)))
  (func (export "pair") (param $x i32) (result i32 i64)
    (local.get $x)
    (i64.shl (i64.extend_i32_s (local.get $x)) (i64.const 32)))

  (func (export "nothing")
    (global.set $calls (i32.add (global.get $calls) (i32.const 1))))
  (func (export "get") (result i32)
    (global.get $calls))

  (func (export "trap")
    unreachable)
  (func (export "spin")
    (loop $forever (br $forever)))

  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages)))
  (func (export "touch") (param $pages i32)
    (local $p i32) (local $end i32)
    (local.set $p (memory.grow (local.get $pages)))
    (if (i32.eq (local.get $p) (i32.const -1)) (then unreachable))
    ;; from the old end (pages * 64 KiB) to the new end, one byte every 4 KiB
    (local.set $end (i32.shl (i32.add (local.get $p) (local.get $pages)) (i32.const 16)))
    (local.set $p (i32.shl (local.get $p) (i32.const 16)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (i32.store8 (local.get $p) (i32.const 1))
        (local.set $p (i32.add (local.get $p) (i32.const 4096)))
        (br $next))))

  (func (export "takes_ref") (param $r externref) (result i32)
    (ref.is_null (local.get $r)))
)
