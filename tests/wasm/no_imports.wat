(module
  (memory 1)
  (data (i32.const 0) "hello")
  (func $f (result i32) i32.const 1)
  (export "f" (func $f))
  (@custom "producers" "\00")
  (@custom "build_id" "\04abcd"))
