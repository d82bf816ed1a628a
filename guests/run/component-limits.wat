;; SPDX-License-Identifier: Apache-2.0
;; component-limits.wat: a component with no imports, for testing that timeouts, fuel and
;; memory/table limits hold for components too.
;;   spin: func()                  loops forever (only a timeout or fuel limit ends it)
;;   trap: func()                  traps (unreachable)
;;   grow: func(pages: u32) -> s32 memory.grow of its core memory (1 page, no maximum): the old
;;                                 size in pages, or -1 when refused
;;   table-bomb: func() -> u32     grows a funcref table by 2^26 elements at a time, halving the
;;                                 step when refused, until the step is 0; returns the table size
;;                                 (exactly the host's element limit)
;; Canonical ABI: only scalars, so the lifted functions need no memory option; u32 and s32 both
;; lift from an i32.
(component
  (core module $Main
    (memory 1)
    (table $t 0 funcref)
    (func (export "spin")
      (loop $forever (br $forever)))
    (func (export "trap")
      unreachable)
    (func (export "grow") (param $pages i32) (result i32)
      (memory.grow (local.get $pages)))
    (func (export "table-bomb") (result i32)
      (local $step i32)
      (local.set $step (i32.const 0x4000000))
      (block $done
        (loop $grow
          (br_if $done (i32.eqz (local.get $step)))
          (if (i32.eq (table.grow $t (ref.null func) (local.get $step)) (i32.const -1))
            (then (local.set $step (i32.shr_u (local.get $step) (i32.const 1)))))
          (br $grow)))
      (table.size $t))
  )
  (core instance $main (instantiate $Main))
  (func (export "spin") (canon lift (core func $main "spin")))
  (func (export "trap") (canon lift (core func $main "trap")))
  (func (export "grow") (param "pages" u32) (result s32) (canon lift (core func $main "grow")))
  (func (export "table-bomb") (result u32) (canon lift (core func $main "table-bomb")))
)
