;; SPDX-License-Identifier: Apache-2.0
;; memory64-bomb.wat: a core module (no imports) with a 64-bit memory that it grows until the
;; host refuses, for testing that a memory limit holds for memory64 too.
;;   bomb() -> i64            grows memory by 16,384 pages (1 GiB) at a time, writing one byte
;;                            per new 64 KiB page (so the host really commits memory); when a
;;                            growth is refused it halves the step, and stops when the step is 0.
;;                            Returns memory.size in pages: exactly the limit, in pages, that
;;                            the host enforces (e.g. 1024 under a 64 MiB limit).
;;   grow(pages: i64) -> i64  one memory.grow: the old size in pages, or -1 when refused
;;   memory                   i64 memory, 1 page initially, no maximum (a 64-bit memory may
;;                            declare up to 2^48 pages)
(module
  (memory (export "memory") i64 1)

  (func (export "grow") (param $pages i64) (result i64)
    (memory.grow (local.get $pages)))

  (func (export "bomb") (result i64)
    (local $step i64) (local $page i64) (local $end i64)
    (local.set $step (i64.const 16384))
    (block $done
      (loop $grow
        (br_if $done (i64.eqz (local.get $step)))
        (local.set $page (memory.grow (local.get $step)))
        (if (i64.eq (local.get $page) (i64.const -1))
          (then (local.set $step (i64.shr_u (local.get $step) (i64.const 1))) (br $grow)))
        (local.set $end (i64.add (local.get $page) (local.get $step)))
        (block $touched
          (loop $touch
            (br_if $touched (i64.ge_u (local.get $page) (local.get $end)))
            (i64.store8 (i64.shl (local.get $page) (i64.const 16)) (i64.const 1))
            (local.set $page (i64.add (local.get $page) (i64.const 1)))
            (br $touch)))
        (br $grow)))
    (memory.size))
)
