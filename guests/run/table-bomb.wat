;; SPDX-License-Identifier: Apache-2.0
;; table-bomb.wat: a core module (no imports) that grows a funcref table until the host refuses,
;; for testing that a limit on table elements holds (a memory limit alone does not bound it).
;;   bomb() -> i32            table.grow by 2^26 null elements (512 MiB of host memory at 8 bytes
;;                            each) at a time; when a growth is refused it halves the step, and
;;                            stops when the step is 0. Returns table.size: exactly the element
;;                            limit the host enforces (without one it would reach 2^32 - 1).
;;   grow(n: i32) -> i32      one table.grow: the old size, or -1 when refused
;;   table                    funcref table, 0 elements initially, no maximum
(module
  (table $t (export "table") 0 funcref)

  (func (export "grow") (param $n i32) (result i32)
    (table.grow $t (ref.null func) (local.get $n)))

  (func (export "bomb") (result i32)
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
