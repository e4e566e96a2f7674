;; Writes to stdout and also imports sock_accept, which a stdout-only profile does not grant.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 0)))))
