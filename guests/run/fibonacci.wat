;; Wess's compute-bound example: fibonacci(n) by iteration, n steps of a loop. fibonacci(-1) is
;; 2^32 - 1 steps (n is i32 and counts down to zero), which bench.py run times through
;; `wasmstore.py call` against `wasmtime run --invoke` on the same module.
(module (memory (export "memory") 16)
  (func (export "fibonacci") (param $n i32) (result i32)
    (local $a i32) (local $b i32) (local $t i32)
    (local.set $b (i32.const 1))
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $t (i32.add (local.get $a) (local.get $b)))
      (local.set $a (local.get $b)) (local.set $b (local.get $t))
      (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br $next)))
    (local.get $a)))
