(module
  (import "a" "f0" (func)) (import "a" "f1" (func)) (import "a" "f2" (func)) (import "a" "f3" (func))
  (import "b" "f4" (func (param i64 f32))) (import "b" "f5" (func (result f64)))
  (global $g (mut i32) (i32.const 0))
  (table 2 funcref)
  (elem (i32.const 0) func 0 1)
  (start 0)
  (func (export "x") (local i32) global.get $g drop))
