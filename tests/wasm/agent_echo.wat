;; Copies stdin to stdout, then writes its environment to stdout ("NAME=value\n" each) and its argv to
;; stderr ("arg\n" each).
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  ;; write(fd, ptr, len): one iovec at 0, bytes written at 8
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  ;; NULs to newlines in [ptr, ptr+len)
  (func $lines (param $ptr i32) (param $len i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
          (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))
  (func (export "_start")
    ;; stdin → stdout through a 64 KiB buffer at 65536 (iovec for reads at 32, count at 40)
    (block $eof
      (loop $more
        (i32.store (i32.const 32) (i32.const 65536))
        (i32.store (i32.const 36) (i32.const 65536))
        (br_if $eof (i32.ne (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)) (i32.const 0)))
        (br_if $eof (i32.eqz (i32.load (i32.const 40))))
        (call $write (i32.const 1) (i32.const 65536) (i32.load (i32.const 40)))
        (br $more)))
    ;; environment: pointers at 1024, strings at 131072, sizes at 48 and 52
    (drop (call $environ_sizes_get (i32.const 48) (i32.const 52)))
    (drop (call $environ_get (i32.const 1024) (i32.const 131072)))
    (call $lines (i32.const 131072) (i32.load (i32.const 52)))
    (call $write (i32.const 1) (i32.const 131072) (i32.load (i32.const 52)))
    ;; argv: pointers at 1024, strings at 196608
    (drop (call $args_sizes_get (i32.const 48) (i32.const 52)))
    (drop (call $args_get (i32.const 1024) (i32.const 196608)))
    (call $lines (i32.const 196608) (i32.load (i32.const 52)))
    (call $write (i32.const 2) (i32.const 196608) (i32.load (i32.const 52)))))
