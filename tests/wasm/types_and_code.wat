(module
  (rec
    (type $node (struct (field $v i32) (field $next (mut (ref null $node)))))
    (type $list (array (mut (ref null $node)))))
  (type $bytes (array (mut i8)))
  (type $cb (func (param (ref null $node) i64) (result i32)))
  (type $void (func))
  (import "env" "log" (func $log (param i32 i32)))
  (import "env" "cb" (func $ext (type $cb)))
  (import "env" "mem" (memory 1 2))
  (import "env" "table" (table 1 funcref))
  (import "env" "node" (global $g (ref null $node)))
  (import "env" "oops" (tag $oops (param i32)))
  (memory $m2 1)
  (table $t2 2 externref)
  (tag $t (type $void))
  (global $count (mut i64) (i64.const 0))
  (func $f (export "f") (param i32) (result i32) (local i64 f32) (local $n (ref null $node))
    local.get 0
    i32.const 1
    i32.add)
  (func $g (type $void) (local v128)
    global.get $count
    i64.const 1
    i64.add
    global.set $count)
  (func (export "h") (param f64) (result f64 f64)
    local.get 0
    local.get 0)
  (export "memory" (memory 0))
  (export "mem2" (memory $m2))
  (export "table" (table 0))
  (export "ext" (table $t2))
  (export "count" (global $count))
  (export "oops" (tag $oops))
  (export "t" (tag $t))
  (export "log" (func $log)))
